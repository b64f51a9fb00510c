"""Where raw examples come from: any TFDS builder (ours included) or a folder of images per class.

A source yields *undecoded* examples {"image": encoded bytes, "label": int64} in a
fixed order for one process's share of a split.  Decoding happens later, after the
shuffle, so the shuffle buffer holds small encoded images (as the official ViT code).
"""
import dataclasses
import logging
import os
import pathlib
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
FOLDER_PREFIX = "folder:"


def _register_our_builders():
  # Importing the modules registers the builders `digits` and `imagenet21k` with TFDS.
  from vit_jax.data import digits, imagenet21k  # pylint: disable=g-import-not-at-top,unused-import


def known_datasets() -> list[str]:
  """Names accepted by `get_dataset`: every TFDS builder, ours, and `folder:<path>`."""
  _register_our_builders()
  return sorted(set(tfds.list_builders(with_community_datasets=False))) + [FOLDER_PREFIX + "<path>"]


def even_slice(n: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
  """[start, stop) of process `index` of `count` (same rule as tfds.even_splits: 11/3 -> 4, 4, 3)."""
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count}).")
  base, extra = divmod(n, count)
  if drop_remainder:
    return index * base, (index + 1) * base
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


class TfdsSource:
  """A TFDS data set, prepared on first use (`digits` builds itself; others as TFDS allows)."""

  def __init__(self, name: str, data_dir: Optional[str], manual_dir: Optional[str] = None,
               download: bool = True):
    _register_our_builders()
    base = name.split("/")[0].split(":")[0]
    if base not in tfds.list_builders(with_community_datasets=False):
      from vit_jax.models.registry import unknown_name_error  # pylint: disable=g-import-not-at-top
      raise unknown_name_error("data set", name, known_datasets())
    self.name = name
    self.builder = tfds.builder(name, data_dir=data_dir)
    if download:
      config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      self.builder.download_and_prepare(download_config=config)

  @property
  def num_classes(self) -> int:
    label = self.builder.info.features["label"]
    return label.num_classes

  def num_examples(self, split) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
      # tfds.testing.mock_data(policy=USE_CODE) knows no split sizes: ask the data set itself.
      return int(self.raw(split).cardinality().numpy())

  def process_split(self, split: str, index: int, count: int, drop_remainder: bool):
    return tfds.split_for_jax_process(split, process_index=index, process_count=count,
                                      drop_remainder=drop_remainder)

  def raw(self, split) -> tf.data.Dataset:
    if self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      return self._raw_array_record(split)
    read_config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True)
    ds = self.builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})


  def _raw_array_record(self, split, chunk: int = 256) -> tf.data.Dataset:
    # TFDS 4.9 has no tf.data reader for ArrayRecord (`as_dataset` raises), so read the
    # serialized records in chunks (one Python call per `chunk` records, the reads run in
    # array_record's C++ threads) and parse them with the data set's own feature spec.
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    instructions = self.builder.info.splits[split].file_instructions
    reader = array_record_data_source.ArrayRecordDataSource(instructions)
    size = len(reader)

    def read(start):
      keys = range(int(start), min(int(start) + chunk, size))
      return np.array(reader.__getitems__(keys), dtype=object)

    records = tf.data.Dataset.range(0, size, chunk).map(
        lambda start: tf.ensure_shape(tf.numpy_function(read, [start], tf.string, stateful=False), [None]))
    features = self.builder.info.features
    parse = lambda r: features.deserialize_example(r, decoders={"image": tfds.decode.SkipDecoding()})
    examples = records.unbatch().map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return examples.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
  split: str
  start: int
  stop: int


class FolderSource:
  """`folder:<root>` with images in `<root>/<split>/<class>/*.jpg` (TFDS ImageFolder layout).

  Labels are the index of the class folder among the sorted union of class names
  over all splits, so train and test agree even if a split misses a class.
  """

  def __init__(self, root: str):
    self.name = FOLDER_PREFIX + root
    self.root = pathlib.Path(root).expanduser()
    if not self.root.is_dir():
      raise FileNotFoundError(f"Image folder {str(self.root)!r} does not exist; expected "
                              f"{self.root}/<split>/<class>/<image>.jpg.")
    splits = sorted(p.name for p in self.root.iterdir() if p.is_dir())
    self.class_names = sorted({c.name for s in splits for c in (self.root / s).iterdir() if c.is_dir()})
    self._files = {}
    for split in splits:
      paths, labels = [], []
      for label, cls in enumerate(self.class_names):
        folder = self.root / split / cls
        if folder.is_dir():
          names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
          paths += [str(folder / f) for f in names]
          labels += [label] * len(names)
      self._files[split] = (paths, labels)
    logging.info("Folder %s: classes=%d, examples=%s", root, len(self.class_names),
                 {s: len(p) for s, (p, _) in self._files.items()})

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _files_of(self, split):
    if isinstance(split, _FolderSplit):
      paths, labels = self._files_of(split.split)
      return paths[split.start:split.stop], labels[split.start:split.stop]
    if split not in self._files:
      raise ValueError(f"Split {split!r} not found in {self.root}; found {sorted(self._files)} "
                       f"(expected {self.root}/<split>/<class>/<image>).")
    return self._files[split]

  def num_examples(self, split) -> int:
    return len(self._files_of(split)[0])

  def process_split(self, split: str, index: int, count: int, drop_remainder: bool):
    start, stop = even_slice(self.num_examples(split), index, count, drop_remainder)
    return _FolderSplit(split, start, stop)

  def raw(self, split) -> tf.data.Dataset:
    paths, labels = self._files_of(split)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
    return ds.map(lambda path, label: {"image": tf.io.read_file(path), "label": label},
                  num_parallel_calls=tf.data.AUTOTUNE)


def get_source(name: str, data_dir: Optional[str] = None, **kwargs):
  if name.startswith(FOLDER_PREFIX):
    return FolderSource(name[len(FOLDER_PREFIX):])
  return TfdsSource(name, data_dir, **kwargs)
