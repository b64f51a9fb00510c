"""`get_dataset`: a resumable, per-process, deterministic tf.data input pipeline.

Stream layout (training):

    epoch e = 0, 1, 2, ...   (flat_map over an endless range)
      position p = 0 .. n-1 in the epoch's order, over this process's sub-split:
      * random-access sources (ArrayRecord builds such as imagenet21k, image folders):
        example index_shuffle(p, seed=f(seed, process, e)), a full permutation per
        epoch computed per index (nothing buffered);
      * record streams (TFRecord TFDS builds): the split in file order through a
        bounded shuffle buffer, seed f(seed, process, e).
    -> decode + crop + resize + augment + normalise (parallel map; per-example
       stateless seed f(seed, process, e, p))
    -> drop undecodable files (counted and logged) -> batch(drop_remainder) -> prefetch

The output after (e, p) depends only on (seed, e, p), so the iterator state is just
the (epoch, position) of the next raw example: `set_state` rebuilds the stream from
there (random access: starts at p directly; streams: `skip` over undecoded records,
cheap next to decoding) and yields exactly what the uninterrupted iterator would have
yielded.  Batches run across epoch ends.

Evaluation: one pass in fixed order, every example once; then padding examples
(mask False, image 0, label 0) so that every process yields the same number of
batches, ceil(largest process share / batch_size).
"""
import logging
import math
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from vit_jax.data import preprocess, sources
from vit_jax.models.layers import to_2tuple

# tf.data runs on the host: keep TensorFlow off the accelerators JAX uses (a GPU build of
# TensorFlow would otherwise reserve GPU memory).
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices; nothing to do then.
  pass

STATE_KEYS = ("epoch", "position", "batches")
_NO_POSITION = -1  # `_position` of eval padding examples.

# Reference recipes: Inception crop + flip for training, plain resize for evaluation,
# [-1, 1] as the official ViT weights.  Digits are not mirror-symmetric and 8 px small:
# plain resize, no flip.
RECIPE_DEFAULTS = {"crop_train": "inception", "crop_eval": "resize", "flip": True}
DATASET_DEFAULTS = {"digits": {"crop_train": "resize", "flip": False}}


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


class DatasetIterator:
  """Iterator of numpy batches with a JSON-serialisable position (`get_state`/`set_state`).

  The state belongs to one process (each process reads its own share): in a
  multi-process run save each process's state.  Without undecodable files all
  training processes hold the same state, since their shares have equal size.
  """

  def __init__(self, build: Callable[[dict[str, int]], tf.data.Dataset], *, epoch_size: int,
               identity: dict[str, Any], num_batches: Optional[int]):
    self._build = build
    self._epoch_size = epoch_size
    self._identity = identity  # What the state is only valid for.
    self.num_batches = num_batches  # Batches per pass (evaluation); None = endless (training).
    self._state = {"epoch": 0, "position": 0, "batches": 0}
    self._iterator = None
    self.skipped = 0  # Undecodable examples dropped since construction / set_state.

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._build(dict(self._state)).as_numpy_iterator()
    batch = next(self._iterator)
    epochs, positions = batch.pop("_epoch"), batch.pop("_position")
    real = positions != _NO_POSITION
    before = self._state["epoch"] * self._epoch_size + self._state["position"]
    if real.any():
      self._state["epoch"] = int(epochs[real][-1])
      self._state["position"] = int(positions[real][-1]) + 1
    if not real.all():  # Evaluation padding: this process's examples are all consumed.
      self._state["position"] = self._epoch_size
    after = self._state["epoch"] * self._epoch_size + self._state["position"]
    skipped = after - before - int(real.sum())
    if skipped > 0:
      self.skipped += skipped
      logging.warning("Skipped %d undecodable image(s) (%d so far in %s).", skipped, self.skipped,
                      self._identity["name"])
    self._state["batches"] += 1
    return batch

  def reset(self):
    """Back to the start (e.g. for the next evaluation pass)."""
    self.set_state({**self._identity, "epoch": 0, "position": 0, "batches": 0})

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: pass to `set_state` of an identically built iterator."""
    return {**self._state, **self._identity}

  def set_state(self, state: dict[str, Any]):
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"Iterator state lacks {missing}; expected a dict from get_state() with "
                       f"keys {list(STATE_KEYS) + list(self._identity)}.")
    mismatched = {k: (state[k], v) for k, v in self._identity.items() if k in state and state[k] != v}
    if mismatched:
      raise ValueError("Iterator state was saved for a different input pipeline (saved, now): "
                       f"{mismatched}. Resume with the same data set, split, seed and process layout.")
    self._state = {k: int(state[k]) for k in STATE_KEYS}
    self._iterator = None
    self.skipped = 0


def _drop_undecodable(ds: tf.data.Dataset) -> tf.data.Dataset:
  # Errors can only come from decoding in the map before this (the other ops cannot fail
  # on an image): corrupt or truncated files, or unreadable ones.  They are dropped here
  # and counted by DatasetIterator from the gaps in `_position`.
  return ds.ignore_errors(log_warning=False)


def get_dataset(name: str, split: str, *, batch_size: int, image_size, train: bool, seed: int = 0,
                data_dir: Optional[str] = None, process_index: Optional[int] = None,
                process_count: Optional[int] = None, crop: Optional[str] = None,
                crop_pct: float = 0.875, flip: Optional[bool] = None, randaugment=None,
                area_range=(0.05, 1.0), normalization: str = "minus_one_one",
                shuffle_buffer: int = 50_000, cache: bool = False, prefetch: int = 2,
                num_parallel_calls: int = tf.data.AUTOTUNE, manual_dir: Optional[str] = None,
                download: bool = True, source=None) -> DatasetIterator:
  """Input pipeline for `name` (TFDS name, `digits`, `imagenet21k/<config>`, `folder:<path>`).

  Args:
    batch_size: examples per batch *of this process* (global batch / process_count).
    image_size: output size, int or (h, w).
    train: endless, shuffled, augmented stream (no mask padding) vs. one ordered
      pass with the last batch padded (mask False on padding).
    seed: shuffle and augmentation seed (each process derives its own from it).
    process_index, process_count: this process's share of the split (None = JAX's).
    crop: "inception" | "resize" | "resize_small_central_crop" (default: Inception
      crop for training, plain resize for evaluation as the official ViT code).
    crop_pct: for "resize_small_central_crop" (timm eval, e.g. 0.875).
    flip: random horizontal flip in training (default True, False for digits).
    randaugment: None or (num_layers, magnitude), e.g. (2, 15).
    normalization: "minus_one_one" (official ViT weights) | "imagenet" (timm mean/std).
    shuffle_buffer: undecoded examples held for shuffling record streams (bounds host
      memory: ~110 kB each for ImageNet JPEGs); random-access sources need none.
    cache: keep the undecoded split in memory (only for small data sets).
    manual_dir: where manually downloaded archives are (imagenet21k, imagenet2012).
    source: `name` already opened (`vit_jax.data.get_source`); then data_dir, manual_dir and
      download are not used.
  Returns:
    DatasetIterator of dicts: image float32 [b, h, w, 3], label int32 [b], mask bool [b].
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  process_index, process_count = _process(process_index, process_count)
  image_size = to_2tuple(image_size)
  defaults = {**RECIPE_DEFAULTS, **DATASET_DEFAULTS.get(name.split("/")[0].split(":")[0], {})}
  crop = crop or (defaults["crop_train"] if train else defaults["crop_eval"])
  flip = defaults["flip"] if flip is None else flip
  preprocess.check_options(crop, normalization)
  if randaugment is not None and len(randaugment) != 2:
    raise ValueError(f"randaugment must be (num_layers, magnitude), e.g. (2, 15); got {randaugment!r}.")

  if source is None:
    source = sources.get_source(name, data_dir, manual_dir=manual_dir, download=download)
  # Training drops the remainder so that every process has an equal share (and epochs in step).
  sub_split = source.process_split(split, process_index, process_count, drop_remainder=train)
  epoch_size = source.num_examples(sub_split)
  if epoch_size == 0 and train:
    raise ValueError(f"Process {process_index} of {process_count} gets no example of {name} {split!r} "
                     f"({source.num_examples(split)} examples); use fewer processes or a bigger split.")
  if train and epoch_size < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {epoch_size} examples of {name} {split!r} "
                     f"per process; use a smaller per-process batch.")
  if epoch_size:
    raw = source.raw(sub_split)
  else:  # More evaluation processes than examples: this one yields padding only.
    raw = tf.data.Dataset.from_tensors({"image": tf.constant(b""), "label": tf.constant(0, tf.int64)}).take(0)
  if cache:
    raw = raw.cache()

  decode = preprocess.make_decode_fn(train=train, image_size=image_size, crop=crop, crop_pct=crop_pct,
                                     area_range=area_range)
  augment = preprocess.make_augment_fn(train=train, flip=flip, randaugment=randaugment,
                                       normalization=normalization)
  # Distinct, reproducible seeds per process; stateless ops take a [2] int64 seed.
  process_seed = np.int64((seed * 1_000_003 + process_index) % (2**31 - 1))

  def example_seed(epoch, position):
    return tf.stack([tf.constant(process_seed, tf.int64), epoch * (2**32) + position])

  def preprocess_example(ex):
    # One map for decode and augmentation: one parallel stage, no hand-over between two.
    seed_ = example_seed(ex["_epoch"], ex["_position"])
    image = augment(decode(ex["image"], seed_), seed_)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True),
            "_epoch": ex["_epoch"], "_position": ex["_position"]}

  options = tf.data.Options()
  options.deterministic = True  # Resume relies on a fixed order.
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1

  identity = {"name": name, "split": split, "seed": int(seed), "train": bool(train),
              "process_index": process_index, "process_count": process_count}

  if train:
    buffer = max(1, min(shuffle_buffer, epoch_size))
    # Random-access sources (ArrayRecord, image folders) shuffle the whole split each epoch;
    # record streams (TFRecord) use the bounded shuffle buffer.  `cache` needs the stream.
    random_access = getattr(source, "random_access", False) and not cache

    def build(state):
      start_epoch, start_position = state["epoch"], state["position"]

      def one_epoch(epoch):
        start = tf.where(epoch == start_epoch, tf.constant(start_position, tf.int64), 0)
        if random_access:
          # A full random permutation per epoch, computed per index (no buffer); resuming
          # starts at `start` directly instead of reading past the skipped records.
          positions = tf.data.Dataset.range(start, epoch_size)
          permutation_seed = tf.stack([tf.constant(process_seed, tf.int64), epoch])
          indices = positions.map(lambda p: tf.random.experimental.index_shuffle(
              p, permutation_seed, tf.constant(epoch_size - 1, tf.int64)))
          ds = tf.data.Dataset.zip(positions, source.read(sub_split, indices))
        else:
          ds = raw.shuffle(buffer, seed=process_seed * 100_003 + epoch, reshuffle_each_iteration=False)
          ds = ds.enumerate().skip(start)
        return ds.map(lambda p, ex: {**ex, "_epoch": epoch, "_position": p})

      ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch)
      ds = _drop_undecodable(ds.map(preprocess_example, num_parallel_calls=num_parallel_calls))
      ds = ds.batch(batch_size, drop_remainder=True)
      return ds.prefetch(prefetch).with_options(options)

    return DatasetIterator(build, epoch_size=epoch_size, identity=identity, num_batches=None)

  # Evaluation: the largest share is the first process's (tfds.even_splits gives it the
  # remainder first), and all processes run that many batches.
  largest = source.num_examples(source.process_split(split, 0, process_count, drop_remainder=False))
  num_batches = math.ceil(largest / batch_size)
  padding = {"image": tf.zeros(image_size + (3,), tf.float32), "label": tf.constant(0, tf.int32),
             "mask": tf.constant(False), "_epoch": tf.constant(0, tf.int64),
             "_position": tf.constant(_NO_POSITION, tf.int64)}

  def build(state):
    ds = raw.enumerate().map(lambda p, ex: {**ex, "_epoch": tf.constant(0, tf.int64), "_position": p})
    ds = ds.skip(state["position"])
    ds = _drop_undecodable(ds.map(preprocess_example, num_parallel_calls=num_parallel_calls))
    remaining = max(0, num_batches - state["batches"])
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(remaining * batch_size).batch(batch_size, drop_remainder=True)
    return ds.prefetch(prefetch).with_options(options)

  return DatasetIterator(build, epoch_size=epoch_size, identity=identity, num_batches=num_batches)
