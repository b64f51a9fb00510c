"""imagenet21k builder on a synthetic release in the official layout (outer tar of per-synset tars)."""
import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from vit_jax import data
from vit_jax.data import imagenet21k

SYNSETS = ["n01440764", "n00004475", "n02084071"]  # Deliberately unsorted in the archive.


def _encode(rng, mode, fmt, size=(24, 20)):
  channels = {"L": (), "RGB": (3,), "CMYK": (4,), "RGBA": (4,)}[mode]
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size[::-1] + channels, dtype=np.uint8), mode).save(buf, fmt)
  return buf.getvalue()


def _names(synset, validation, count):
  names = (f"{synset}_{i}.JPEG" for i in range(10_000))
  return [n for n in names if imagenet21k.is_validation(n) == validation][:count]


def _add(tar, name, content):
  info = tarfile.TarInfo(name)
  info.size = len(content)
  tar.addfile(info, io.BytesIO(content))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """fall11_whole.tar: 3 synsets x (4 train + 1 validation) images, with grey, CMYK, PNG and one corrupt."""
  rng = np.random.default_rng(0)
  manual = tmp_path_factory.mktemp("manual")
  kinds = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG")]
  with tarfile.open(manual / "fall11_whole.tar", "w") as outer:
    for s, synset in enumerate(SYNSETS):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for name, kind in zip(_names(synset, False, 4), kinds):
          content = b"\xff\xd8 broken" if (s, kind) == (0, ("RGBA", "PNG")) else _encode(rng, *kind)
          _add(inner, name, content)
        _add(inner, _names(synset, True, 1)[0], _encode(rng, "RGB", "JPEG"))
      _add(outer, f"{synset}.tar", inner_buf.getvalue())
  return manual


@pytest.mark.parametrize("manual_exists", [False, True])
def test_missing_download_names_files_and_place(tmp_path, manual_exists):
  manual = tmp_path / "downloads" / "manual"
  if manual_exists:  # A manual folder holding something else: our own message.
    manual.mkdir(parents=True)
    (manual / "winter21_whole.tar.gz").write_bytes(b"")
  with pytest.raises(Exception) as error:
    data.get_dataset("imagenet21k/fall11", "train", batch_size=2, image_size=16, train=True,
                     data_dir=str(tmp_path), process_index=0, process_count=1)
  for part in ("fall11_whole.tar", "winter21_whole.tar.gz", str(manual)):
    assert part in str(error.value)


def test_builds_array_record_with_sorted_synset_labels(release, tmp_path, caplog):
  import tensorflow_datasets as tfds
  kw = dict(data_dir=str(tmp_path), manual_dir=str(release), process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    train = list(data.get_dataset("imagenet21k/fall11", "train", batch_size=4, image_size=16, train=False, **kw))
  assert "Skipping unreadable image n01440764/" in caplog.text
  builder = tfds.builder("imagenet21k/fall11", data_dir=str(tmp_path))
  assert builder.info.file_format.value == "array_record"
  assert builder.info.features["label"].names == sorted(SYNSETS)
  assert data.num_classes("imagenet21k/fall11", data_dir=str(tmp_path)) == 3
  assert data.num_examples("imagenet21k/fall11", "train", data_dir=str(tmp_path)) == 11  # 12 - corrupt.
  assert data.num_examples("imagenet21k/fall11", "validation", data_dir=str(tmp_path)) == 3
  labels = np.concatenate([b["label"][b["mask"]] for b in train])
  assert sorted(labels.tolist()) == [0] * 4 + [1] * 3 + [2] * 4  # n00004475 -> 0, n01440764 (corrupt) -> 1.
  assert all(b["image"].shape == (4, 16, 16, 3) for b in train)
  source = builder.as_data_source(split="validation")  # Random access.
  assert len(source) == 3 and source[2]["image"].shape[-1] == 3
  halves = [list(data.get_dataset("imagenet21k/fall11", "train", batch_size=4, image_size=16, train=False,
                                  **{**kw, "process_index": i, "process_count": 2})) for i in (0, 1)]
  pixels = lambda batches: sorted(im.tobytes() for b in batches for im in b["image"][b["mask"]])
  assert [sum(int(b["mask"].sum()) for b in h) for h in halves] == [6, 5]
  assert pixels(halves[0] + halves[1]) == pixels(train)  # Union = whole split, no duplicates.
  # Training reads a fresh random permutation of the records each epoch (random access).
  raw = dict(crop="resize", flip=False, normalization="none")
  epochs = data.get_dataset("imagenet21k/fall11", "train", batch_size=11, image_size=16, train=True,
                                   **raw, **kw)
  plain = [b["image"] for b in data.get_dataset("imagenet21k/fall11", "train", batch_size=11, image_size=16,
                                                train=False, **raw, **kw)]
  first, second = next(epochs), next(epochs)
  assert pixels([first]) == pixels([second]) == sorted(im.tobytes() for im in plain[0])
  assert not np.array_equal(first["image"], second["image"])
  epochs.set_state({**epochs.get_state(), "epoch": 0, "position": 0})
  np.testing.assert_array_equal(next(epochs)["image"], first["image"])


def test_winter21_reads_gzipped_release(tmp_path):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(1)
  with tarfile.open(tmp_path / "winter21_whole.tar.gz", "w:gz") as outer:
    for synset in ("n02", "n01"):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for name in _names(synset, False, 2) + _names(synset, True, 1):
          _add(inner, name, _encode(rng, "RGB", "JPEG"))
      _add(outer, f"{synset}.tar", inner_buf.getvalue())
  builder = tfds.builder("imagenet21k/winter21", data_dir=str(tmp_path / "tfds"))
  path = tmp_path / "winter21_whole.tar.gz"
  synsets = builder._synsets(path)  # pylint: disable=protected-access
  assert synsets == ["n01", "n02"]
  train = list(builder._generate_examples(path, synsets, validation=False))  # pylint: disable=protected-access
  assert sorted((key.split("/")[0], ex["label"]) for key, ex in train) == [("n01", 0)] * 2 + [("n02", 1)] * 2
  assert len(list(builder._generate_examples(path, synsets, validation=True))) == 2  # pylint: disable=protected-access
