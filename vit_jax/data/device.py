"""Host batches -> global jax.Arrays, a few batches ahead (multi-process aware; the train loop's input)."""
import collections
from typing import Any, Iterator

import jax
import numpy as np


def to_global(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays.

  `sharding`: one Sharding for every array of `batch`, or a dict key -> Sharding
  (then only those keys are transferred, e.g. no `mask` for training).  Every
  process passes its own part (first axis = per-process batch); the global batch
  is their concatenation in process order.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k])) for k, s in sharding.items()}


class PrefetchIterator:
  """Keeps `size` batches on the devices ahead of the consumer.

  `get_state` / `set_state` report the position after the last batch *handed out*,
  not after the prefetched ones, so checkpoints resume exactly.
  """

  def __init__(self, iterator: Iterator[dict], size: int, sharding: Any):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}.")
    self._iterator = iterator
    self._size = size
    self._sharding = sharding
    self._queue = collections.deque()
    self._state = self._source_state()
    self.num_batches = getattr(iterator, "num_batches", None)

  def _source_state(self):
    return self._iterator.get_state() if hasattr(self._iterator, "get_state") else None

  def _fill(self):
    while len(self._queue) < self._size:
      try:
        batch = next(self._iterator)
      except StopIteration:
        return
      self._queue.append((to_global(batch, self._sharding), self._source_state()))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    self._fill()  # Start the next transfers before the caller computes on `batch`.
    return batch

  def get_state(self):
    return self._state

  @property
  def skipped(self) -> int:
    """Undecodable examples the wrapped iterator dropped so far (prefetched batches included)."""
    return int(getattr(self._iterator, "skipped", 0))

  def set_state(self, state):
    self._iterator.set_state(state)
    self._queue.clear()
    self._state = self._source_state()


def prefetch_to_device(iterator: Iterator[dict], size: int, sharding: Any) -> PrefetchIterator:
  """Wraps a `get_dataset` iterator: yields dicts of global jax.Arrays laid out by `sharding`.

  E.g. `sharding = NamedSharding(mesh, P(("data", "fsdp")))` splits the batch axis over
  the data-parallel mesh axes; each process feeds its own `batch_size` examples.
  """
  return PrefetchIterator(iterator, size, sharding)
