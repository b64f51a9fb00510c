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


def check_coordinator_port_free(address: str) -> None:
  """Process 0 hosts the coordinator on [::]:PORT.  When that port is taken, JAX's coordinator service logs
  "Failed to add port to server" and then crashes the process (a segmentation fault): refuse first, in words."""
  import errno
  import socket
  port = int(address.rsplit(":", 1)[1])
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this machine: the IPv4 probe decides
    try:
      # As gRPC binds: connections of an earlier run left in TIME_WAIT do not make the port busy.
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((host, port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        continue  # e.g. IPv6 present but unusable: the IPv4 probe decides
      raise ValueError(f"the coordinator port {port} is already in use on this machine ({e.strerror}): "
                       f"choose another port in --coordinator_address={address.rsplit(':', 1)[0]}:PORT") from None
    finally:
      probe.close()
    return
