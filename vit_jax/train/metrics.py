"""What a user sees: terminal progress, TensorBoard scalars (clu) and `WORKDIR/metrics.jsonl`.

Only process 0 writes files; the others log to their own terminal only.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from typing import Mapping

import jax


class MetricsLogger:
  """Writes scalars to TensorBoard (clu metric writer) and appends them as JSON lines."""

  def __init__(self, workdir: str):
    from clu import metric_writers
    self.is_main = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir if self.is_main else None,
                                                       just_logging=not self.is_main, asynchronous=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.jsonl:
      self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self.jsonl.flush()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
    if self.jsonl:
      self.jsonl.close()


class Progress:
  """One terminal line every `every_secs`: step, loss, learning rate, img/s and ETA."""

  def __init__(self, total_steps: int, global_batch: int, every_secs: float = 5.0, start_step: int = 0):
    self.total, self.batch, self.every = total_steps, global_batch, every_secs
    self.last_time, self.last_step = time.time(), start_step
    self.paused_secs = 0.0
    self.first = True

  def pause(self, seconds: float) -> None:
    """Time spent outside training (evaluation, checkpoint waits) does not count towards img/s."""
    self.paused_secs += seconds

  @contextlib.contextmanager
  def paused(self):
    """`with progress.paused(): ...`: the block's time does not count towards img/s."""
    start = time.time()
    try:
      yield
    finally:
      self.pause(time.time() - start)

  def maybe_report(self, step: int, loss: float, lr: float, force: bool = False) -> None:
    now = time.time()
    if self.first:  # the first step includes compilation: no meaningful speed yet
      if jax.process_index() == 0:
        print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | first step done "
              f"(compilation included) in {now - self.last_time:.1f}s", flush=True)
      self.first = False
      self.last_time, self.last_step, self.paused_secs = now, step, 0.0
      return
    if not force and now - self.last_time < self.every:
      return
    elapsed = max(now - self.last_time - self.paused_secs, 1e-9)
    steps = step - self.last_step
    steps_per_sec = steps / elapsed
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    eta_text = str(datetime.timedelta(seconds=int(eta))) if eta != float("inf") else "?"
    if jax.process_index() == 0:
      print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | "
            f"{steps_per_sec * self.batch:,.0f} img/s | ETA {eta_text}", flush=True)
    self.last_time, self.last_step, self.paused_secs = now, step, 0.0
