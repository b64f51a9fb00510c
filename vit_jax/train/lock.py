"""One training run per workdir: `WORKDIR/lock`, held for the whole run, that a killed run does not leave stuck.

    with WorkdirLock(workdir):      # raises WorkdirLockedError naming the other run (host, PID)
      ...train...

The lock file holds JSON {host, pid, started, heartbeat}.  The holder keeps an
exclusive `flock` on it (the kernel drops it when the process dies, SIGKILL
included) and rewrites `heartbeat` every HEARTBEAT_SECS.  A second run:

  * finds the flock taken                  -> refuses, naming host and PID;
  * gets the flock, and the file names
      - nobody, or a process of this host that no longer exists (or another process
        that reuses its PID: the start time differs)        -> stale: takes it over;
      - a process of another host (shared file systems do not always carry flocks)
        whose heartbeat is older than STALE_SECS           -> stale: takes it over;
      - otherwise                                           -> refuses.

Only process 0 of a multi-process run takes the lock (they share the workdir); the
others learn the outcome from it, so all of them stop or none does.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

LOCK_NAME = "lock"
HEARTBEAT_SECS = 30.0
STALE_SECS = 300.0  # a heartbeat older than this (another host's run) is a dead run's


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _process_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux), which tells a PID reused by another process apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start_time: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  current = _process_start_time(pid)
  return start_time is None or current is None or current == start_time


def describe(info: dict) -> str:
  age = time.time() - float(info.get("heartbeat", info.get("started", time.time())))
  return (f"host {info.get('host')!r}, PID {info.get('pid')} (started "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info.get('started', 0))))}, "
          f"last heartbeat {age:.0f} s ago)")


class WorkdirLock:
  """An exclusive lock of `workdir` for this process (see the module docstring)."""

  def __init__(self, workdir: str, *, heartbeat_secs: float = HEARTBEAT_SECS, stale_secs: float = STALE_SECS):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.heartbeat_secs, self.stale_secs = heartbeat_secs, stale_secs
    self._fd = None
    self._stop = threading.Event()
    self._thread = None
    self.took_over = None  # the stale holder's info when this lock replaced one

  # ------------------------------------------------------------------------- acquire / release

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        info = self._read(fd)
        os.close(fd)
        raise WorkdirLockedError(self._refusal(info, "holds it"))
      # The file may have been removed (released) between open and flock: lock the current one.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    info = self._read(fd)
    if info and not self._stale(info):
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise WorkdirLockedError(self._refusal(info, "seems to hold it (another host: its flock is not visible "
                                                   "here, but its heartbeat is recent)"))
    if info:
      self.took_over = info
    self._fd = fd
    self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "process_start": _process_start_time(os.getpid())}
    self._write()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      os.unlink(self.path)  # still under our flock: nobody else can hold it
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  # ------------------------------------------------------------------------- helpers

  def _refusal(self, info: dict, what: str) -> str:
    return (f"Another training run {what}: {describe(info)} is using {os.path.dirname(self.path)} "
            f"(lock file {self.path}). Two runs on one workdir would overwrite each other's checkpoints: wait "
            "for it to finish, stop it, or use another --workdir. If that run is certainly gone (e.g. on another "
            f"host), delete {self.path}.")

  def _stale(self, info: dict) -> bool:
    try:
      pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
      return True  # unreadable or half-written: its writer died mid-write
    if info.get("host") == socket.gethostname():
      return not _alive(pid, info.get("process_start"))
    return time.time() - float(info.get("heartbeat", 0)) > self.stale_secs

  @staticmethod
  def _read(fd) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 65536).decode("utf-8", "replace")
      return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
      return {"unreadable": True}

  def _write(self) -> None:
    payload = json.dumps(dict(self._info, heartbeat=time.time())).encode()
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.ftruncate(self._fd, 0)
    os.write(self._fd, payload)
    os.fsync(self._fd)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_secs):
      try:
        self._write()
      except OSError:  # a full disk must not kill the run; a stale heartbeat only matters to other hosts
        pass


class _Held:
  """What `lock_workdir` returns: a context manager that releases the lock (on process 0)."""

  def __init__(self, lock: WorkdirLock | None):
    self.lock = lock

  def __enter__(self):
    return self.lock

  def __exit__(self, *exc):
    if self.lock is not None:
      self.lock.release()


def lock_workdir(workdir: str) -> _Held:
  """Locks `workdir` for this run: process 0 takes the lock, and every process raises
  WorkdirLockedError (naming the other run) when it could not, so all of them stop or none does."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.train import multihost  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except (WorkdirLockedError, OSError) as e:
      error = str(e) if isinstance(e, WorkdirLockedError) else f"cannot lock {workdir}: {e}"
  errors = multihost.allgather_json(error)
  if errors[0] is not None:
    if lock is not None:
      lock.release()
    raise WorkdirLockedError(errors[0])
  if lock is not None and lock.took_over:
    print(f"Note: took over the lock of a run that is gone ({describe(lock.took_over)}).", flush=True)
  return _Held(lock)
