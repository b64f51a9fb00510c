"""What the processes of a multi-process run tell each other (no-ops with one process)."""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def allgather_json(obj: Any) -> list[Any]:
  """`obj` (JSON-serialisable) of every process, in process order."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(everything, np.ravel(lengths))]


def any_process(flag: bool) -> bool:
  """True when `flag` is true on at least one process (every process must call it)."""
  return any(allgather_json(bool(flag)))


def sync(name: str) -> None:
  """Waits until every process has reached the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
