"""`dataset="synthetic"`: learnable random images made from (seed, step) alone (no files, no TensorFlow).

Each class has a fixed random prototype image; an example is its class's
prototype plus noise.  Batch `t` is a function of (seed, t) only and every
process cuts its rows out of the same global batch, so the global batch is
identical for any number of processes: the data source for smoke runs,
benchmarks without disk, and multi-process equivalence tests.

The training stream is endless; for durations in epochs a training "epoch" is
NUM_TRAIN_EXAMPLES examples.  Evaluation is one pass over NUM_EVAL_EXAMPLES.
"""
from __future__ import annotations

import numpy as np

NAME = "synthetic"
NUM_TRAIN_EXAMPLES = 1024  # nominal: the size of an "epoch" of the endless training stream
NUM_EVAL_EXAMPLES = 256


class SyntheticSource:
  """What `vit_jax.data.get_source("synthetic")` knows: the split sizes (the class count is the caller's)."""

  name = NAME

  @property
  def num_classes(self) -> int:
    raise ValueError("dataset='synthetic' has as many classes as asked for: it needs config.num_classes > 0.")

  def num_examples(self, split: str) -> int:
    """NUM_TRAIN_EXAMPLES for `train` (also `train[...]`), NUM_EVAL_EXAMPLES for any other split."""
    return NUM_TRAIN_EXAMPLES if split.split("[")[0] == "train" else NUM_EVAL_EXAMPLES


def _prototypes(num_classes: int, image_size: tuple[int, int], seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 2**31 - 1])
  return rng.normal(0.0, 1.0, (num_classes, *image_size, 3)).astype(np.float32)


def _examples(rng: np.random.Generator, protos: np.ndarray, n: int):
  labels = rng.integers(0, protos.shape[0], n).astype(np.int32)
  images = protos[labels] + rng.normal(0.0, 1.0, (n, *protos.shape[1:])).astype(np.float32)
  return images.astype(np.float32), labels


class SyntheticTrain:
  """Infinite training iterator with get_state()/set_state() (exact resume)."""

  def __init__(self, *, global_batch_size: int, num_classes: int, image_size: tuple[int, int], seed: int,
               process_index: int, process_count: int):
    if global_batch_size % process_count:
      raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes.")
    self.batch, self.seed = global_batch_size, seed
    self.rows = slice(process_index * global_batch_size // process_count,
                      (process_index + 1) * global_batch_size // process_count)
    self.protos = _prototypes(num_classes, image_size, seed)
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    images, labels = _examples(np.random.default_rng([self.seed, self.step]), self.protos, self.batch)
    self.step += 1
    return {"image": images[self.rows], "label": labels[self.rows]}

  def get_state(self) -> dict:
    # Batch t is cut out of the same global batch for any process count: a "global" order.
    return {"step": self.step, "order": "global"}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


def synthetic_eval(*, global_batch_size: int, num_classes: int, image_size: tuple[int, int], seed: int,
                   process_index: int, process_count: int):
  """One pass over NUM_EVAL_EXAMPLES fixed examples, the last batch padded and masked."""
  images, labels = _examples(np.random.default_rng([seed, -1 % 2**32]), _prototypes(num_classes, image_size, seed),
                             NUM_EVAL_EXAMPLES)
  local = global_batch_size // process_count
  for start in range(0, NUM_EVAL_EXAMPLES, global_batch_size):
    rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
    mask = rows < NUM_EVAL_EXAMPLES
    rows = np.minimum(rows, NUM_EVAL_EXAMPLES - 1)
    yield {"image": images[rows], "label": labels[rows], "mask": mask}
