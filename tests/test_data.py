"""Input pipeline: digits builder, exact resume, per-process sharding, padding, bad files, TFDS mocks."""
import io
import json
import logging
import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import data

RAW = dict(crop="resize", normalization="none", flip=False)  # 8x8 digits unchanged: pixels identify examples.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def examples(batches):
  """Multiset of (pixels, label) of the unmasked examples."""
  keys = collections.Counter()
  for b in batches:
    for image, label, mask in zip(b["image"], b["label"], b["mask"]):
      if mask:
        keys[(np.asarray(image, np.uint8).tobytes(), int(label))] += 1
  return keys


def take(it, n):
  return [next(it) for _ in range(n)]


def test_digits_builder_matches_sklearn(tfds_dir):
  from sklearn.datasets import load_digits
  assert data.num_examples("digits", "train", data_dir=tfds_dir) == 1438
  assert data.num_examples("digits", "test", data_dir=tfds_dir) == 359
  assert data.num_classes("digits", data_dir=tfds_dir) == 10
  it = data.get_dataset("digits", "test", batch_size=359, image_size=8, train=False, data_dir=tfds_dir,
                        process_index=0, process_count=1, **RAW)
  (batch,) = list(it)
  ref = load_digits()
  test = np.arange(len(ref.target)) % 5 == 4  # TFDS stores them in its own (hashed) order.
  grey = (ref.images[test] * 255 // 16).astype(np.uint8)
  want = collections.Counter((np.repeat(g[..., None], 3, -1).tobytes(), int(y)) for g, y in zip(grey, ref.target[test]))
  assert examples([batch]) == want
  assert batch["mask"].all() and batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32


def test_train_epochs_are_permutations_and_batches_cross_epochs(tfds_dir):
  # 1438 examples, batches of 500: batch 3 holds the end of epoch 0 and the start of epoch 1.
  it = data.get_dataset("digits", "train", batch_size=500, image_size=8, train=True, data_dir=tfds_dir,
                        process_index=0, process_count=1, **RAW)
  batches = take(it, 6)  # 3000 examples: epochs 0 and 1, 124 of epoch 2.
  images = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "mask")}
  epoch = lambda i: {k: v[i * 1438:(i + 1) * 1438] for k, v in images.items()}
  ref = examples(data.get_dataset("digits", "train", batch_size=719, image_size=8, train=False,
                                  data_dir=tfds_dir, process_index=0, process_count=1, **RAW))
  assert examples([epoch(0)]) == ref and examples([epoch(1)]) == ref
  assert not np.array_equal(epoch(0)["label"], epoch(1)["label"])  # Reshuffled per epoch.
  assert it.get_state()["epoch"] == 2 and it.get_state()["position"] == 3000 - 2 * 1438


@pytest.mark.parametrize("crop", ["inception", "resize"])
def test_exact_resume_through_json(tfds_dir, crop):
  kw = dict(batch_size=96, image_size=16, train=True, data_dir=tfds_dir, process_index=1, process_count=4,
            crop=crop, flip=True, seed=3)
  reference = take(data.get_dataset("digits", "train", **kw), 6)  # 359 per process: crosses 1 epoch end.
  first = data.get_dataset("digits", "train", **kw)
  take(first, 2)
  state = json.loads(json.dumps(first.get_state()))
  resumed = data.get_dataset("digits", "train", **kw)
  resumed.set_state(state)
  for want, got in zip(reference[2:], take(resumed, 4)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  other_seed = next(data.get_dataset("digits", "train", **{**kw, "seed": 4}))
  assert not np.array_equal(other_seed["image"], reference[0]["image"])


def test_resume_rejects_other_pipeline(tfds_dir):
  kw = dict(batch_size=8, image_size=8, train=True, data_dir=tfds_dir, process_count=2)
  state = data.get_dataset("digits", "train", process_index=0, **kw).get_state()
  with pytest.raises(ValueError, match="process_index"):
    data.get_dataset("digits", "train", process_index=1, **kw).set_state(state)
  with pytest.raises(ValueError, match="lacks"):
    data.get_dataset("digits", "train", process_index=0, **kw).set_state({"epoch": 0})


def test_eval_four_processes_cover_split_once_with_equal_batches(tfds_dir):
  kw = dict(batch_size=32, image_size=8, train=False, data_dir=tfds_dir, **RAW)
  whole = examples(data.get_dataset("digits", "test", process_index=0, process_count=1, **kw))
  assert sum(whole.values()) == 359
  union, counts = collections.Counter(), []
  for index in range(4):  # 359 = 90 + 90 + 90 + 89 -> 3 batches each, the last padded.
    it = data.get_dataset("digits", "test", process_index=index, process_count=4, **kw)
    batches = list(it)
    assert len(batches) == it.num_batches == 3
    padding = np.concatenate([b["mask"] for b in batches]) == 0
    assert all(np.all(b["image"][~b["mask"]] == 0) for b in batches)
    counts.append(int((~padding).sum()))
    union += examples(batches)
  assert counts == [90, 90, 90, 89]
  assert union == whole


def test_eval_resume_mid_pass(tfds_dir):
  kw = dict(batch_size=100, image_size=8, train=False, data_dir=tfds_dir, process_index=0, process_count=1)
  full = list(data.get_dataset("digits", "test", **kw))
  it = data.get_dataset("digits", "test", **kw)
  next(it)
  resumed = data.get_dataset("digits", "test", **kw)
  resumed.set_state(it.get_state())
  rest = list(resumed)
  assert len(rest) == 3 and list(resumed) == []
  resumed.reset()
  np.testing.assert_array_equal(next(resumed)["image"], full[0]["image"])
  for want, got in zip(full[1:], rest):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["mask"], got["mask"])


def test_unknown_name_lists_close_names():
  with pytest.raises(ValueError, match="cifar10"):
    data.get_dataset("cifar1O", "train", batch_size=2, image_size=8, train=True, process_index=0, process_count=1)
  assert "digits" in data.known_datasets() and "cifar10" in data.known_datasets()


def test_bad_options_are_named(tfds_dir):
  kw = dict(batch_size=2, image_size=8, train=True, data_dir=tfds_dir, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="crop"):
    data.get_dataset("digits", "train", crop="center", **kw)
  with pytest.raises(ValueError, match="normalization"):
    data.get_dataset("digits", "train", normalization="0-1", **kw)
  with pytest.raises(ValueError, match="batch_size"):
    data.get_dataset("digits", "train", **{**kw, "batch_size": 5000})


def test_pipeline_with_randaugment(tfds_dir):
  kw = dict(batch_size=16, image_size=16, train=True, data_dir=tfds_dir, process_index=0, process_count=1)
  plain = next(data.get_dataset("digits", "train", **kw))
  augmented = next(data.get_dataset("digits", "train", randaugment=(2, 15), **kw))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert not np.array_equal(plain["image"], augmented["image"])
  assert augmented["image"].min() >= -1.0 and augmented["image"].max() <= 1.0
  with pytest.raises(ValueError, match="randaugment"):
    data.get_dataset("digits", "train", randaugment=(2,), **kw)


def _jpeg(rng, size, mode="RGB", fmt="JPEG"):
  pixels = rng.integers(0, 256, size[::-1] + ((len(mode),) if len(mode) > 1 else ()), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels, mode).save(buf, fmt)
  return buf.getvalue()


def test_folder_grey_rgba_and_corrupt_files(tmp_path, caplog):
  rng = np.random.default_rng(0)
  files = {
      "train/cat/a.jpg": _jpeg(rng, (40, 30)), "train/cat/b.jpg": _jpeg(rng, (30, 50), "L"),
      "train/cat/broken.jpg": b"not an image at all",
      "train/dog/c.png": _jpeg(rng, (20, 20), "RGBA", "PNG"), "train/dog/d.JPG": _jpeg(rng, (64, 48)),
      "train/dog/truncated.jpg": _jpeg(rng, (64, 64))[:300], "train/dog/e.jpg": _jpeg(rng, (33, 44)),
      "test/dog/f.jpg": _jpeg(rng, (40, 40)), "test/bird/g.jpg": _jpeg(rng, (40, 40)),
  }
  for name, content in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(content)
  name = f"folder:{tmp_path}"
  assert data.num_classes(name) == 3  # bird, cat, dog (sorted union over splits).
  assert data.num_examples(name, "train") == 7
  # 2 of 7 files are bad: far more than the default 1% allows, so the pass stops naming the first one ...
  with pytest.raises(data.pipeline.UndecodableDataError, match=r"1 of the ~7 examples .* evaluation pass.*broken\.jpg"):
    list(data.get_dataset(name, "train", batch_size=4, image_size=16, train=False, process_index=0,
                          process_count=1))
  # ... and with a tolerant limit they are skipped, counted and logged with their files.
  tolerant = dict(max_bad_fraction=0.5)
  with caplog.at_level(logging.WARNING):
    it = data.get_dataset(name, "train", batch_size=4, image_size=16, train=False, process_index=0,
                          process_count=1, **tolerant)
    batches = list(it)
  assert [int(b["mask"].sum()) for b in batches] == [4, 1]  # broken + truncated dropped.
  assert sorted(np.concatenate([b["label"][b["mask"]] for b in batches]).tolist()) == [1, 1, 2, 2, 2]
  assert it.skipped == 2 and [p.rsplit("/", 1)[1] for p in it.skipped_ids] == ["broken.jpg", "truncated.jpg"]
  assert "Skipped 1 undecodable" in caplog.text and "2 so far" in caplog.text and "truncated.jpg" in caplog.text
  kw = dict(batch_size=4, image_size=16, train=True, process_index=0, process_count=1, **tolerant)
  reference = take(data.get_dataset(name, "train", **kw), 5)  # 5 good images per epoch: 4 epochs.
  for batch in reference:  # Inception crop via decode_and_crop_jpeg and the PNG fallback.
    assert batch["image"].shape == (4, 16, 16, 3) and np.abs(batch["image"]).max() <= 1.0
  first = data.get_dataset(name, "train", **kw)
  take(first, 2)
  resumed = data.get_dataset(name, "train", **kw)
  resumed.set_state(first.get_state())  # Exact resume although files are skipped.
  for want, got in zip(reference[2:], take(resumed, 3)):
    np.testing.assert_array_equal(want["image"], got["image"])
  with pytest.raises(data.pipeline.UndecodableDataError, match="epoch 0"):  # training stops as well
    take(data.get_dataset(name, "train", **{**kw, "max_bad_fraction": 0.01}), 5)
  # 2 test images over 3 processes: the third has none and still yields the common 1 batch.
  shares = [list(data.get_dataset(name, "test", batch_size=2, image_size=8, train=False, process_index=i,
                                  process_count=3)) for i in range(3)]
  assert [[int(b["mask"].sum()) for b in share] for share in shares] == [[1], [1], [0]]
  with pytest.raises(ValueError, match="Split 'val' not found"):
    data.num_examples(name, "val")


def test_tfds_mock_cifar10():
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.get_dataset("cifar10", "train", batch_size=8, image_size=32, train=True,
                             process_index=0, process_count=1, normalization="imagenet")
    batch = next(train)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].max() < 10
    evaluation = list(data.get_dataset("cifar10", "test", batch_size=10, image_size=24, train=False,
                                       process_index=0, process_count=1))
    assert [int(b["mask"].sum()) for b in evaluation] == [10, 10, 4]


def test_importing_data_and_the_trainer_loads_no_tensorflow():
  """TensorFlow loads when a tf.data pipeline is built, not on `import vit_jax.data` (synthetic runs, mixup)."""
  import subprocess
  import sys
  code = ("import sys, vit_jax.data, vit_jax.data.mixup, vit_jax.data.synthetic, vit_jax.train.trainer; "
          "assert vit_jax.data.num_examples('synthetic', 'train') > 0; print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"


def test_synthetic_source_sizes():
  source = data.get_source("synthetic")
  from vit_jax.data import synthetic
  assert source.num_examples("train") == synthetic.NUM_TRAIN_EXAMPLES
  assert source.num_examples("test") == synthetic.NUM_EVAL_EXAMPLES
  with pytest.raises(ValueError, match="needs config.num_classes > 0"):
    data.num_classes("synthetic")


def test_only_decoding_errors_are_skipped(tmp_path):
  """A file that vanished after listing (or any error but a failed decode) stops the pipeline, never shrinks it."""
  rng = np.random.default_rng(0)
  for i in range(4):
    (tmp_path / "test" / "a").mkdir(parents=True, exist_ok=True)
    (tmp_path / "test" / "a" / f"{i}.jpg").write_bytes(_jpeg(rng, (8, 8)))
  source = data.get_source(f"folder:{tmp_path}")
  (tmp_path / "test" / "a" / "2.jpg").unlink()
  import tensorflow as tf
  with pytest.raises(tf.errors.NotFoundError, match="2.jpg"):
    list(data.get_dataset(f"folder:{tmp_path}", "test", batch_size=2, image_size=8, train=False,
                          process_index=0, process_count=1, source=source, max_bad_fraction=1.0))
  with pytest.raises(ValueError, match="area_range"):
    data.get_dataset(f"folder:{tmp_path}", "test", batch_size=2, image_size=8, train=True, area_range=(0.5, 2.0),
                     process_index=0, process_count=1, source=source)


def test_global_order_does_not_depend_on_the_process_count(tfds_dir):
  """Random-access training: 2 processes x 48 read the rows of the same global batches as 1 x 96, and a
  2-process position resumes on 1 process (and back) in the exact global example order."""
  kw = dict(image_size=8, train=True, data_dir=tfds_dir, seed=5, **RAW)
  one = data.get_dataset("digits", "train", batch_size=96, process_index=0, process_count=1, **kw)
  reference = take(one, 20)  # 1920 examples: crosses the end of epoch 0 (1438)
  two = [data.get_dataset("digits", "train", batch_size=48, process_index=i, process_count=2, **kw) for i in (0, 1)]
  for step in range(7):
    rows = [next(it) for it in two]
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([r[k] for r in rows]), reference[step][k])
  states = [json.loads(json.dumps(it.get_state())) for it in two]
  assert states[0]["order"] == "global" and {k: v for k, v in states[0].items() if k != "process_index"} == \
      {k: v for k, v in states[1].items() if k != "process_index"}
  resumed = data.get_dataset("digits", "train", batch_size=96, process_index=0, process_count=1, **kw)
  resumed.set_state(states[1])  # any process's position: they are the same
  for step in range(7, 14):
    got = next(resumed)
    for k in ("image", "label"):
      np.testing.assert_array_equal(got[k], reference[step][k])
  back = [data.get_dataset("digits", "train", batch_size=48, process_index=i, process_count=2, **kw) for i in (0, 1)]
  for it in back:
    it.set_state(resumed.get_state())
  for step in range(14, 20):
    rows = [next(it) for it in back]
    np.testing.assert_array_equal(np.concatenate([r["image"] for r in rows]), reference[step]["image"])
