"""TFDS builder `digits`: scikit-learn's bundled 8x8 hand-written digits (no download).

1,797 grey-scale 8x8 images of the digits 0-9 (scikit-learn ships them inside the
package, so preparing needs no network).  Stored as-is, 8x8, as uint8 RGB PNGs:
the 17 grey levels 0..16 are scaled to 0..255 (v * 255 // 16) and copied to the
three channels, so the pipeline treats them like any photo data set and resizes
them to the model's input size.

Stored as ArrayRecord (random access): training reads a fresh permutation of the
whole split per epoch, in an order that does not depend on the number of processes.

Splits are deterministic and independent of any random number generator:
example i (scikit-learn order) goes to `test` when i % 5 == 4, else to `train`
(1,438 train / 359 test; the order cycles through the classes, so both splits
hold every class in about equal share).
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = {"train": 1438, "test": 359}


def _digits_arrays():
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.
  digits = load_digits()
  grey = (digits.images.astype(np.int32) * 255 // 16).astype(np.uint8)  # [n, 8, 8], 0..16 -> 0..255
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  return rgb, digits.target.astype(np.int64)


def split_indices(n: int, split: str) -> np.ndarray:
  """Deterministic 80/20 split by position: every fifth example is held out."""
  is_test = np.arange(n) % 5 == 4
  return np.flatnonzero(is_test if split == "test" else ~is_test)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (UCI optdigits test set) as a TFDS data set."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "8x8 uint8 RGB, train = i % 5 != 4, test = i % 5 == 4.",
                   "1.1.0": "The same examples, stored as ArrayRecord (random access)."}

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
            "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = _digits_arrays()
    for i in split_indices(len(images), split):
      yield int(i), {"image": images[i], "label": int(labels[i])}
