"""Where raw examples come from: any TFDS builder (ours included) or a folder of images per class.

A source yields *undecoded* examples {"image": encoded bytes, "label": int64} in a
fixed order for one process's share of a split.  Decoding happens later, after the
shuffle, so the shuffle buffer holds small encoded images (as the official ViT code).
"""
import dataclasses
import difflib
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


def unknown_dataset_error(name: str) -> ValueError:
  # The full list has ~450 TFDS names: show the close ones and where to find the rest.
  known = known_datasets()
  close = difflib.get_close_matches(name.split("/")[0], known, n=5, cutoff=0.6)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return ValueError(
      f"Unknown data set {name!r}.{hint} Use a TFDS name (e.g. 'cifar10', 'imagenet2012'; all "
      f"{len(known) - 1} in vit_jax.data.known_datasets()), 'digits', 'imagenet21k/fall11', "
      f"'imagenet21k/winter21' or '{FOLDER_PREFIX}<root>' with <root>/<split>/<class>/<image>.jpg.")


def even_slice(n: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
  """[start, stop) of process `index` of `count` (same rule as tfds.even_splits: 11/3 -> 4, 4, 3)."""
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count}).")
  base, extra = divmod(n, count)
  if drop_remainder:
    return index * base, (index + 1) * base
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


class DatasetDownloadError(RuntimeError):
  """A TFDS data set that is not on disk could not be downloaded (e.g. no network on this machine)."""


# Exception classes (by name, anywhere in the cause chain) of a download that failed: no network, DNS,
# refused connection, time-out (socket, urllib, requests/urllib3 as TFDS's downloader uses) or TFDS's own.
_DOWNLOAD_ERRORS = ("gaierror", "ConnectionError", "NameResolutionError", "NewConnectionError", "MaxRetryError",
                    "URLError", "TimeoutError", "Timeout", "ConnectTimeout", "DownloadError")
_NETWORK_ERRORS = _DOWNLOAD_ERRORS[:-1]


def download_failure(error: BaseException) -> str | None:
  """'no network: <reason>' / 'the download failed: <reason>' when `error` comes from a failed download."""
  seen, chain = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for kinds, what in ((_NETWORK_ERRORS, "no network"), (_DOWNLOAD_ERRORS, "the download failed")):
    for e in reversed(chain):  # the root cause names the problem best (e.g. the DNS failure)
      if any(k.__name__ in kinds for k in type(e).__mro__):
        return f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
  return None


def download_advice(name: str, data_dir, failure: str) -> str:
  base = name.split("/")[0].split(":")[0]
  root = os.fspath(data_dir) if data_dir else os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (f"Could not download the data set {name!r} to prepare it ({failure}). TFDS downloads and prepares a data "
          f"set on its first use. To use it here, prepare it on a machine with network access:\n"
          f"    pip install tensorflow-datasets importlib_resources && tfds build {base} --data_dir=DIR\n"
          f"  (or python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR')"
          f".download_and_prepare()\"), copy DIR/{base} to this machine and point data_dir at the copy's parent "
          f"folder: --config.data_dir=DIR (Python: data_dir=DIR); it is then read from there, nothing is downloaded. "
          f"(The data directory now is {root}.)")


class TfdsSource:
  """A TFDS data set, prepared on first use (`digits` builds itself; others as TFDS allows)."""

  def __init__(self, name: str, data_dir: Optional[str], manual_dir: Optional[str] = None,
               download: bool = True):
    _register_our_builders()
    base = name.split("/")[0].split(":")[0]
    if base not in tfds.list_builders(with_community_datasets=False):
      raise unknown_dataset_error(name)
    self.name = name
    self.builder = tfds.builder(name, data_dir=data_dir)
    if download:
      config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      try:
        self.builder.download_and_prepare(download_config=config)
      except Exception as e:  # pylint: disable=broad-except
        # Several processes preparing the same data set (e.g. `digits` on first use): the
        # one that loses the final rename fails although the data set is now there.
        rebuilt = tfds.builder(name, data_dir=data_dir)
        if not rebuilt.is_prepared():
          failure = download_failure(e)
          if failure is not None:
            raise DatasetDownloadError(download_advice(name, data_dir, failure)) from e
          raise
        self.builder = rebuilt

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

  @property
  def random_access(self) -> bool:
    return self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD

  def describe(self, split, index: int) -> str:
    """How to find example `index` of `split` (for the log of undecodable examples)."""
    return f"record {index} of {self.name} split {str(split)!r}"

  def raw(self, split) -> tf.data.Dataset:
    if self.random_access:
      return self.read(split, tf.data.Dataset.range(self.num_examples(split)))
    read_config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True)
    ds = self.builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64)})


  def read(self, split, indices: tf.data.Dataset, chunk: int = 256) -> tf.data.Dataset:
    """Examples at `indices` (int64 data set) of an ArrayRecord split, in that order."""
    # TFDS 4.9 has no tf.data reader for ArrayRecord (`as_dataset` raises), so read the
    # serialized records in chunks (one Python call per `chunk` records; the reads run in
    # array_record's C++ threads) and parse them with the data set's own feature spec.
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    reader = array_record_data_source.ArrayRecordDataSource(self.builder.info.splits[split].file_instructions)

    def read_chunk(keys):
      return np.array(reader.__getitems__([int(k) for k in keys]), dtype=object)

    records = indices.batch(chunk).map(
        lambda keys: tf.ensure_shape(tf.numpy_function(read_chunk, [keys], tf.string, stateful=False), [None]))
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

  random_access = True

  def describe(self, split, index: int) -> str:
    """The file of example `index` of `split` (for the log of undecodable examples)."""
    paths, _ = self._files_of(split)
    return paths[index] if 0 <= index < len(paths) else f"example {index} of {self.name} split {split!r}"

  def raw(self, split) -> tf.data.Dataset:
    return self.read(split, tf.data.Dataset.range(self.num_examples(split)))

  def read(self, split, indices: tf.data.Dataset) -> tf.data.Dataset:
    """Examples at `indices` (int64 data set), in that order."""
    paths, labels = self._files_of(split)
    paths, labels = tf.constant(paths, tf.string), tf.constant(labels, tf.int64)
    return indices.map(lambda i: {"image": tf.io.read_file(paths[i]), "label": labels[i]},
                       num_parallel_calls=tf.data.AUTOTUNE)


def get_source(name: str, data_dir: Optional[str] = None, **kwargs):
  if name.startswith(FOLDER_PREFIX):
    return FolderSource(name[len(FOLDER_PREFIX):])
  return TfdsSource(name, data_dir, **kwargs)
