"""TFDS builder `imagenet21k`: the full ImageNet release from the manual-download folder.

TFDS has no builder for it; this one reads the official archives as distributed by
image-net.org, which you download yourself (login required) and put into the TFDS
manual folder (`<data_dir>/downloads/manual/`, or `manual_dir=` of get_dataset):

  * config `fall11`:   `fall11_whole.tar`      21,841 synsets, ~14.2M images; the release
                       the official ViT/AugReg checkpoints were pre-trained on.
  * config `winter21`: `winter21_whole.tar.gz` 19,167 synsets, ~13.2M images; the
                       current release (person and offensive synsets removed).

Each is an outer archive of per-synset tars (`n01440764.tar`, ...) of JPEGs.  Labels
are the index of the synset in the sorted list of synsets found in the archive (saved
as the label names).  There is no official validation split: `validation` holds a
deterministic ~2% of each synset (images whose name hashes into the first 2 of 100
buckets), `train` the rest, as a fixed, reproducible held-out set.

Images are checked while building: non-RGB (grey, CMYK) or non-JPEG files (a few PNGs
and GIFs hide under .JPEG names) are re-encoded as RGB JPEG; files PIL cannot read are
skipped and counted in the log.  Output is ArrayRecord (random access, e.g. for grain).
"""
import hashlib
import io
import logging
import os
import tarfile

from etils import epath
import tensorflow_datasets as tfds

VALIDATION_BUCKETS = 2  # Out of 100: ~2% of each synset held out.


class Imagenet21kConfig(tfds.core.BuilderConfig):

  def __init__(self, *, archive: str, num_synsets: int, **kwargs):
    super().__init__(**kwargs)
    self.archive = archive
    self.num_synsets = num_synsets  # Of the official release; a different count is logged, not refused.


def is_validation(image_name: str) -> bool:
  """Deterministic held-out assignment from the file name alone (stable across machines)."""
  digest = hashlib.md5(image_name.encode()).digest()
  return int.from_bytes(digest[:4], "little") % 100 < VALIDATION_BUCKETS


def clean_jpeg(content: bytes):
  """Returns RGB JPEG bytes for `content`, or None when it is not a readable image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(content)) as image:
      if image.format == "JPEG" and image.mode == "RGB":
        return content  # The common case: stored unchanged, no re-encoding loss.
      image.load()
      out = io.BytesIO()
      image.convert("RGB").save(out, "JPEG", quality=95)
      return out.getvalue()
  except Exception:  # pylint: disable=broad-except  # PIL raises many types on broken files.
    return None


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k (full ImageNet) from the official manual download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "fall11 and winter21 releases; 2% hashed validation split."}
  BUILDER_CONFIGS = [
      Imagenet21kConfig(name="fall11", archive="fall11_whole.tar", num_synsets=21841,
                        description="Fall 2011 release, 21,841 synsets (ViT pre-training)."),
      Imagenet21kConfig(name="winter21", archive="winter21_whole.tar.gz", num_synsets=19167,
                        description="Winter 2021 release, 19,167 synsets."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "fall11"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download from https://image-net.org/download-images (account needed) the archive of
  the config you build, unchanged:
    imagenet21k/fall11:   fall11_whole.tar
    imagenet21k/winter21: winter21_whole.tar.gz
  and place it in the manual folder: `<data_dir>/downloads/manual/` (default
  ~/tensorflow_datasets/downloads/manual/), or pass `manual_dir=`.
  """
  # TFDS 4.9.10 looks up the file of a builder inside a package through `importlib_resources`,
  # a back-port it does not install on Python >= 3.9 (ImportError); this is the file.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord (random access) unless asked otherwise.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(),  # Names (synsets) are set when the archive is read.
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/",
    )

  def _archive_path(self, dl_manager) -> epath.Path:
    path = epath.Path(dl_manager.manual_dir) / self.builder_config.archive
    if not path.exists():
      raise FileNotFoundError(
          f"imagenet21k/{self.builder_config.name} needs the manual download "
          f"{self.builder_config.archive!r} at {path}. Download it from "
          "https://image-net.org/download-images and place it there (or pass manual_dir=). "
          "Expected files: fall11_whole.tar (config fall11) or winter21_whole.tar.gz (config winter21).")
    return path

  def _synsets(self, path: epath.Path) -> list[str]:
    # One pass over the outer archive's headers (seeks in a .tar; a .tar.gz has to be inflated).
    with tarfile.open(os.fspath(path), mode="r:*") as outer:
      names = sorted(os.path.basename(m.name)[:-len(".tar")] for m in outer
                     if m.isfile() and m.name.endswith(".tar"))
    if not names:
      raise ValueError(f"{path} holds no per-synset tars (n01440764.tar, ...): not an ImageNet release.")
    if len(names) != self.builder_config.num_synsets:
      logging.warning("%s holds %d synsets; the official release has %d.", path, len(names),
                      self.builder_config.num_synsets)
    return names

  def _split_generators(self, dl_manager):
    path = self._archive_path(dl_manager)
    synsets = self._synsets(path)
    self.info.features["label"].names = synsets
    return {"train": self._generate_examples(path, synsets, validation=False),
            "validation": self._generate_examples(path, synsets, validation=True)}

  def _generate_examples(self, path: epath.Path, synsets: list[str], validation: bool):
    label_of = {s: i for i, s in enumerate(synsets)}
    skipped = 0
    # Streamed ("r|*"): outer and inner tars are read sequentially, never unpacked to disk.
    with tarfile.open(os.fspath(path), mode="r|*") as outer:
      for member in outer:
        if not (member.isfile() and member.name.endswith(".tar")):
          continue
        synset = os.path.basename(member.name)[:-len(".tar")]
        with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
          for image_member in inner:
            if not image_member.isfile():
              continue
            name = os.path.basename(image_member.name)
            if is_validation(name) != validation:
              continue
            content = clean_jpeg(inner.extractfile(image_member).read())
            if content is None:
              skipped += 1
              logging.warning("Skipping unreadable image %s/%s (%d skipped so far).", synset, name, skipped)
              continue
            yield f"{synset}/{name}", {"image": content, "label": label_of[synset], "file_name": name}
    if skipped:
      logging.warning("imagenet21k %s: skipped %d unreadable image(s).",
                      "validation" if validation else "train", skipped)
