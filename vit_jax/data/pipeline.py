"""`get_dataset`: a resumable, per-process, deterministic tf.data input pipeline.

Stream layout (training):

  * random-access sources (ArrayRecord builds: digits, imagenet21k; image folders): one
    *global* stream s = 0, 1, 2, ... over the whole split: epoch s // n, position s % n,
    example index_shuffle(s % n, seed=f(seed, epoch)), a full permutation per epoch
    computed per index (nothing buffered).  Global batch b is stream positions
    [b*G, (b+1)*G) (G = batch_size * process_count) and process i reads rows
    [i*B, (i+1)*B) of it, so the global example order does not depend on the number of
    processes: a run resumed with another process count continues it exactly.
  * record streams (TFRecord TFDS builds): each process reads its own sub-split
    (`tfds.split_for_jax_process`) in file order through a bounded shuffle buffer, seed
    f(seed, process, epoch).  Its position belongs to that process layout: resuming with
    another process count restarts the stream (`vit_jax.train.checkpoint` says so).
    -> decode (the only step whose failures are skipped) -> resize + augment + normalise
       (per-example stateless seed f(seed, epoch, position)) -> batch -> prefetch

The output after a position depends only on (seed, position), so the iterator state is
just the position of the next raw example: `set_state` rebuilds the stream from there
(random access: starts there directly; streams: `skip` over undecoded records, cheap next
to decoding) and yields exactly what the uninterrupted iterator would have yielded.
Batches run across epoch ends.

Undecodable examples (corrupt or truncated files) are skipped, counted, and logged with
their file or record id; more than `max_bad_fraction` of an epoch (default 1%) stops the
pipeline with `UndecodableDataError`.  Any other error (a missing file, a wrong option)
is raised, never skipped.

Evaluation: one pass in fixed order, every example once; then padding examples
(mask False, image 0, label 0) so that every process yields the same number of
batches, ceil(largest process share / batch_size).
"""
import collections
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
GLOBAL, PER_PROCESS = "global", "per_process"  # the two example orders (see the module docstring)
_NO_POSITION = -1  # `_k` of eval padding examples.
_MAX_IDS_LOGGED = 20
_DECODE_CHUNK = 16  # examples per isolated decode data set (see `decode_chunk`)

# Reference recipes: Inception crop + flip for training, plain resize for evaluation,
# [-1, 1] as the official ViT weights.  Digits are not mirror-symmetric and 8 px small:
# plain resize, no flip.
RECIPE_DEFAULTS = {"crop_train": "inception", "crop_eval": "resize", "flip": True}
DATASET_DEFAULTS = {"digits": {"crop_train": "resize", "flip": False}}


class UndecodableDataError(ValueError):
  """More examples than `max_bad_fraction` of an epoch (or of an evaluation pass) could not be decoded."""


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


class DatasetIterator:
  """Iterator of numpy batches with a JSON-serialisable position (`get_state`/`set_state`).

  The state belongs to one process (each process reads its own share): in a
  multi-process run save each process's state.  With the global order (random-access
  training) every process holds the same state unless it skipped undecodable examples
  (`offset`), and a state may be given to a run with another process count.
  """

  def __init__(self, build: Callable[[dict[str, int]], tf.data.Dataset], *, epoch_size: int,
               identity: dict[str, Any], num_batches: Optional[int], order: str = PER_PROCESS,
               locate: Optional[Callable] = None, describe: Optional[Callable] = None,
               global_step: tuple[int, int] = (0, 0), examples_per_epoch: Optional[float] = None,
               max_bad_fraction: float = 0.01):
    self._build = build
    self._epoch_size = epoch_size  # examples per epoch of the positions (global order: the whole split)
    self._identity = identity  # What the state is only valid for.
    self.order = order
    self.num_batches = num_batches  # Batches per pass (evaluation); None = endless (training).
    self._locate = locate  # (build state, k) -> (epoch, position) of this process's k-th raw example
    self._describe = describe  # (epoch, position) -> the file or record of that example
    self._global_batch, self._local_batch = global_step  # global order: G and B
    self._per_epoch = epoch_size if examples_per_epoch is None else examples_per_epoch
    self.max_bad_fraction = max_bad_fraction
    self._state = {"epoch": 0, "position": 0, "batches": 0, "offset": 0}
    self._iterator = None
    self.skipped = 0  # Undecodable examples dropped since construction / set_state.
    self.skipped_ids: list[str] = []  # The first of them (file or record ids).
    self._skipped_by_epoch = collections.Counter()

  def __iter__(self):
    return self

  def _start_k(self, state) -> int:
    """This process's index of the next raw example, in the numbering of `_build(state)`."""
    if self.order == GLOBAL:
      return state["offset"]
    if not self._identity["train"]:
      return state["position"]
    return state["epoch"] * self._epoch_size + state["position"]

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._built = dict(self._state)
      self._batches_since_build = 0
      self._next_k = self._start_k(self._built)
      self._iterator = self._build(dict(self._built)).as_numpy_iterator()
    batch = next(self._iterator)
    ks = batch.pop("_k")
    real = ks != _NO_POSITION
    missing = []
    if real.any():
      present = ks[real]
      last = int(present[-1])
      if last + 1 - self._next_k != present.size:  # gaps: skipped (undecodable) examples
        missing = sorted(set(range(self._next_k, last + 1)) - set(int(k) for k in present))
      self._next_k = last + 1
    if not real.all() and not self._identity["train"]:  # Evaluation padding: the share is consumed.
      missing += list(range(self._next_k, self._epoch_size))
      self._next_k = max(self._next_k, self._epoch_size)
    self._batches_since_build += 1
    self._state["batches"] += 1
    if self.order == GLOBAL:
      start = self._built["epoch"] * self._epoch_size + self._built["position"]
      stream = start + self._batches_since_build * self._global_batch
      self._state["epoch"], self._state["position"] = divmod(stream, self._epoch_size)
      self._state["offset"] = self._next_k - self._batches_since_build * self._local_batch
    elif self._identity["train"]:
      self._state["epoch"], self._state["position"] = divmod(self._next_k, max(self._epoch_size, 1))
    else:
      self._state["epoch"], self._state["position"] = 0, self._next_k
    if missing:
      self._count_skipped(missing)
    return batch

  def _count_skipped(self, missing: list[int]) -> None:
    where = [self._locate(self._built, k) for k in missing]
    ids = [self._describe(e, p) for e, p in where]
    self.skipped += len(missing)
    self.skipped_ids += ids[:max(0, _MAX_IDS_LOGGED - len(self.skipped_ids))]
    name = f"{self._identity['name']} {self._identity['split']!r}"
    logging.warning("Skipped %d undecodable example(s) of %s: %s (%d so far).", len(missing), name,
                    ", ".join(ids), self.skipped)
    for epoch, _ in where:
      self._skipped_by_epoch[epoch] += 1
    epoch, count = max(self._skipped_by_epoch.items(), key=lambda kv: kv[1])
    allowed = self.max_bad_fraction * self._per_epoch
    if count > allowed:
      what = f"epoch {epoch}" if self._identity["train"] else "the evaluation pass"
      raise UndecodableDataError(
          f"{count} of the ~{int(round(self._per_epoch))} examples this process read in {what} of {name} could not "
          f"be decoded, more than max_bad_fraction={self.max_bad_fraction:g} allows ({allowed:.1f}). First: "
          f"{', '.join(self.skipped_ids[:5])}. Fix or remove those files (the data set may be broken, or not "
          "images), or raise the limit (config.max_bad_fraction, get_dataset(max_bad_fraction=...)).")

  def reset(self):
    """Back to the start (e.g. for the next evaluation pass)."""
    self.set_state({**self._identity, "order": self.order, "epoch": 0, "position": 0, "batches": 0})

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: pass to `set_state` of an identically built iterator."""
    state = {k: self._state[k] for k in STATE_KEYS}
    if self.order == GLOBAL:
      state["offset"] = self._state["offset"]
    return {**state, "order": self.order, **self._identity}

  def set_state(self, state: dict[str, Any]):
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"Iterator state lacks {missing}; expected a dict from get_state() with "
                       f"keys {list(STATE_KEYS) + list(self._identity)}.")
    order = state.get("order", PER_PROCESS)
    if order != self.order:
      raise ValueError(f"Iterator state was saved for the {order} example order, this pipeline reads the "
                       f"{self.order} order (the data set's storage changed?); it cannot continue exactly.")
    layout = ("process_index", "process_count")
    same_count = state.get("process_count", self._identity["process_count"]) == self._identity["process_count"]
    ignore = layout if self.order == GLOBAL and not same_count else ()
    mismatched = {k: (state[k], v) for k, v in self._identity.items()
                  if k in state and k not in ignore and state[k] != v}
    if mismatched:
      raise ValueError("Iterator state was saved for a different input pipeline (saved, now): "
                       f"{mismatched}. Resume with the same data set, split, seed and process layout.")
    offset = int(state.get("offset", 0))
    if offset and not same_count:  # Skipped examples shifted that process's rows; restart at the batch.
      logging.warning("The saved position is %d example(s) past its global batch on process %s of %s "
                      "(undecodable examples skipped); with %d processes the stream continues at the start "
                      "of that global batch.", offset, state.get("process_index"), state.get("process_count"),
                      self._identity["process_count"])
      offset = 0
    self._state = {**{k: int(state[k]) for k in STATE_KEYS}, "offset": offset}
    self._iterator = None
    self.skipped = 0
    self.skipped_ids = []
    self._skipped_by_epoch = collections.Counter()


def get_dataset(name: str, split: str, *, batch_size: int, image_size, train: bool, seed: int = 0,
                data_dir: Optional[str] = None, process_index: Optional[int] = None,
                process_count: Optional[int] = None, crop: Optional[str] = None,
                crop_pct: float = 0.875, flip: Optional[bool] = None, randaugment=None,
                area_range=(0.05, 1.0), normalization: str = "minus_one_one",
                shuffle_buffer: int = 50_000, cache: bool = False, prefetch: int = 2,
                num_parallel_calls: int = tf.data.AUTOTUNE, manual_dir: Optional[str] = None,
                download: bool = True, source=None, max_bad_fraction: float = 0.01) -> DatasetIterator:
  """Input pipeline for `name` (TFDS name, `digits`, `imagenet21k/<config>`, `folder:<path>`).

  Args:
    batch_size: examples per batch *of this process* (global batch / process_count).
    image_size: output size, int or (h, w).
    train: endless, shuffled, augmented stream (no mask padding) vs. one ordered
      pass with the last batch padded (mask False on padding).
    seed: shuffle and augmentation seed.
    process_index, process_count: this process's share of the split (None = JAX's).
    crop: "inception" | "resize" | "resize_small_central_crop" (default: Inception
      crop for training, plain resize for evaluation as the official ViT code).
    crop_pct: for "resize_small_central_crop" (timm eval, e.g. 0.875).
    flip: random horizontal flip in training (default True, False for digits).
    randaugment: None or (num_layers, magnitude), e.g. (2, 15).
    normalization: "minus_one_one" (official ViT weights) | "imagenet" (timm mean/std).
    shuffle_buffer: undecoded examples held for shuffling record streams (bounds host
      memory: ~110 kB each for ImageNet JPEGs); random-access sources need none.
    cache: keep the undecoded split in memory (only for small data sets; evaluation and
      record streams: random-access training reads by index anyway).
    manual_dir: where manually downloaded archives are (imagenet21k, imagenet2012).
    source: `name` already opened (`vit_jax.data.get_source`); then data_dir, manual_dir and
      download are not used.
    max_bad_fraction: undecodable examples are skipped up to this fraction of what the
      process reads per epoch (or per evaluation pass); beyond it UndecodableDataError.
  Returns:
    DatasetIterator of dicts: image float32 [b, h, w, 3], label int32 [b], mask bool [b].
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0.0 <= max_bad_fraction <= 1.0:
    raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
  process_index, process_count = _process(process_index, process_count)
  image_size = to_2tuple(image_size)
  defaults = {**RECIPE_DEFAULTS, **DATASET_DEFAULTS.get(name.split("/")[0].split(":")[0], {})}
  crop = crop or (defaults["crop_train"] if train else defaults["crop_eval"])
  flip = defaults["flip"] if flip is None else flip
  preprocess.check_options(crop, normalization)
  preprocess.check_area_range(area_range)
  if randaugment is not None and len(randaugment) != 2:
    raise ValueError(f"randaugment must be (num_layers, magnitude), e.g. (2, 15); got {randaugment!r}.")

  if source is None:
    source = sources.get_source(name, data_dir, manual_dir=manual_dir, download=download)
  # Random-access sources train on one global order over the whole split; record streams give
  # each process an equal share (the remainder dropped, so that epochs stay in step).
  global_order = train and getattr(source, "random_access", False)

  decode = preprocess.make_decode_only_fn(train=train, crop=crop, area_range=area_range)
  finish = preprocess.make_resize_fn(train=train, image_size=image_size, crop=crop, crop_pct=crop_pct)
  augment = preprocess.make_augment_fn(train=train, flip=flip, randaugment=randaugment,
                                       normalization=normalization)
  # Reproducible seeds; stateless ops take a [2] int64 seed.  The global order's do not depend on
  # the process (an example is augmented the same whichever process reads it).
  run_seed = np.int64((seed * 1_000_003) % (2**31 - 1))
  process_seed = np.int64((seed * 1_000_003 + process_index) % (2**31 - 1))
  example_seed_base = run_seed if global_order else process_seed

  def decode_example(ex):
    # Decoding alone: the examples it fails on are the ones skipped (ignore_errors right after).
    seed_ = tf.stack([tf.constant(example_seed_base, tf.int64), ex["_epoch"] * (2**32) + ex["_position"]])
    return {"image": decode(ex["image"], seed_), "label": tf.cast(ex["label"], tf.int32), "_k": ex["_k"],
            "_seed": seed_}

  def finish_example(ex):
    image = augment(finish(ex["image"]), ex["_seed"])
    return {"image": image, "label": ex["label"], "mask": tf.constant(True), "_k": ex["_k"]}

  def decode_chunk(chunk):
    # `ignore_errors` drops an element whenever anything upstream of it fails (reading a file,
    # parsing a record ...), so it only wraps a data set made of the chunk's encoded examples
    # and the decode: a failed decode is the only error skipped (DatasetIterator counts it from
    # the gap in `_k`); everything else reaches the caller.
    return tf.data.Dataset.from_tensor_slices(chunk).map(decode_example).ignore_errors(log_warning=False)

  def preprocessed(ds):
    # Chunks of 16 examples amortise the per-chunk data set; a deterministic parallel interleave
    # that reads each chunk to its end before the next keeps the order.
    ds = ds.batch(_DECODE_CHUNK).interleave(decode_chunk, cycle_length=num_parallel_calls,
                                            block_length=_DECODE_CHUNK, num_parallel_calls=num_parallel_calls,
                                            deterministic=True)
    return ds.map(finish_example, num_parallel_calls=num_parallel_calls)

  options = tf.data.Options()
  options.deterministic = True  # Resume relies on a fixed order.
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1

  identity = {"name": name, "split": split, "seed": int(seed), "train": bool(train),
              "process_index": process_index, "process_count": process_count}
  common = dict(identity=identity, max_bad_fraction=max_bad_fraction)

  if global_order:
    n = source.num_examples(split)
    global_batch = batch_size * process_count
    if n < global_batch:
      raise ValueError(f"batch_size={batch_size} x {process_count} process(es) = {global_batch} exceeds the {n} "
                       f"examples of {name} {split!r}; use a smaller batch.")

    def index_of(epoch, position):
      permutation_seed = tf.stack([tf.constant(run_seed, tf.int64), tf.cast(epoch, tf.int64)])
      return tf.random.experimental.index_shuffle(tf.cast(position, tf.int64), permutation_seed,
                                                  tf.constant(n - 1, tf.int64))

    def locate(state, k):
      stream = (state["epoch"] * n + state["position"] + (k // batch_size) * global_batch
                + process_index * batch_size + k % batch_size)
      return divmod(stream, n)

    def describe(epoch, position):
      return source.describe(split, int(index_of(epoch, position).numpy()))

    def build(state):
      start = state["epoch"] * n + state["position"]

      def where(k):  # this process's k-th raw example: rows [i*B, (i+1)*B) of each global batch
        stream = start + (k // batch_size) * global_batch + process_index * batch_size + k % batch_size
        return {"_k": k, "_epoch": stream // n, "_position": stream % n}

      meta = tf.data.Dataset.range(state["offset"], 2**62).map(where)
      indices = meta.map(lambda m: index_of(m["_epoch"], m["_position"]))
      ds = tf.data.Dataset.zip(meta, source.read(split, indices)).map(lambda m, ex: {**ex, **m})
      ds = preprocessed(ds).batch(batch_size, drop_remainder=True)
      return ds.prefetch(prefetch).with_options(options)

    return DatasetIterator(build, epoch_size=n, num_batches=None, order=GLOBAL, locate=locate,
                           describe=describe, global_step=(global_batch, batch_size),
                           examples_per_epoch=n / process_count, **common)

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

  if train:  # a record stream, per process
    buffer = max(1, min(shuffle_buffer, epoch_size))

    def locate(state, k):
      del state
      return divmod(k, epoch_size)

    def describe(epoch, position):
      return (f"example {position} (in shuffled order) of epoch {epoch} of {name} split {str(sub_split)!r} "
              "(a TFRecord stream: no record id)")

    def build(state):
      start_epoch, start_position = state["epoch"], state["position"]

      def one_epoch(epoch):
        start = tf.where(epoch == start_epoch, tf.constant(start_position, tf.int64), 0)
        ds = raw.shuffle(buffer, seed=process_seed * 100_003 + epoch, reshuffle_each_iteration=False)
        ds = ds.enumerate().skip(start)
        return ds.map(lambda p, ex: {**ex, "_k": epoch * epoch_size + p, "_epoch": epoch, "_position": p})

      ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch)
      ds = preprocessed(ds).batch(batch_size, drop_remainder=True)
      return ds.prefetch(prefetch).with_options(options)

    return DatasetIterator(build, epoch_size=epoch_size, num_batches=None, locate=locate, describe=describe,
                           **common)

  # Evaluation: the largest share is the first process's (tfds.even_splits gives it the
  # remainder first), and all processes run that many batches.
  largest = source.num_examples(source.process_split(split, 0, process_count, drop_remainder=False))
  num_batches = math.ceil(largest / batch_size)
  padding = {"image": tf.zeros(image_size + (3,), tf.float32), "label": tf.constant(0, tf.int32),
             "mask": tf.constant(False), "_k": tf.constant(_NO_POSITION, tf.int64)}

  def build(state):
    ds = raw.enumerate().map(lambda p, ex: {**ex, "_k": p, "_epoch": tf.constant(0, tf.int64), "_position": p})
    ds = preprocessed(ds.skip(state["position"]))
    remaining = max(0, num_batches - state["batches"])
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(remaining * batch_size).batch(batch_size, drop_remainder=True)
    return ds.prefetch(prefetch).with_options(options)

  return DatasetIterator(build, epoch_size=epoch_size, num_batches=num_batches,
                         locate=lambda state, k: (0, k), describe=lambda e, p: source.describe(sub_split, p),
                         **common)
