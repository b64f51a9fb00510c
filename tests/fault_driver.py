"""`python -m vit_jax.main` with faults injected, for tests/test_faults.py (never used outside the tests).

    python tests/fault_driver.py --config=... --workdir=...      # the same flags as vit_jax.main

Environment (each optional):
  FAULT_SLOW_COMMIT=SECS  before Orbax publishes a checkpoint (renames its temporary folder) print
                          "FAULT-POINT commit <folder>" and wait SECS: a kill then lands in the middle
                          of an asynchronous save (the arrays written, nothing published)
  FAULT_SLOW_EVAL=SECS    after the first evaluation batch print "FAULT-POINT eval" and wait SECS: a kill
                          then lands in the middle of an evaluation
  FAULT_WRITE_ERROR=ERRNO[@N]  the N-th checkpoint save (default 2) fails part-way: the writer of the `data`
                          item raises OSError(ERRNO) while the arrays are being written (28 = ENOSPC,
                          13 = EACCES)
"""
import asyncio
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def install_faults() -> None:
  slow_commit = float(os.environ.get("FAULT_SLOW_COMMIT", 0))
  if slow_commit:
    try:
      from orbax.checkpoint._src.path import atomicity
      original = atomicity.AtomicRenameTemporaryPath.finalize
    except (ImportError, AttributeError):  # another Orbax layout: wait right after the save started instead
      from vit_jax.train import checkpoint
      original_save = checkpoint.Checkpointer.save

      def save(self, step, *args, **kwargs):
        started = original_save(self, step, *args, **kwargs)
        print(f"FAULT-POINT commit step {step}", flush=True)
        time.sleep(slow_commit)
        return started

      checkpoint.Checkpointer.save = save
    else:
      async def finalize(self, *args, **kwargs):
        print(f"FAULT-POINT commit {self.get()}", flush=True)
        await asyncio.sleep(slow_commit)
        return await original(self, *args, **kwargs)

      atomicity.AtomicRenameTemporaryPath.finalize = finalize

  slow_eval = float(os.environ.get("FAULT_SLOW_EVAL", 0))
  if slow_eval:
    from vit_jax.train import trainer
    original_iterator = trainer.eval_iterator

    def eval_iterator(*args, **kwargs):
      def batches():
        for i, batch in enumerate(original_iterator(*args, **kwargs)):
          if i == 1:
            print("FAULT-POINT eval", flush=True)
            time.sleep(slow_eval)
          yield batch
      return batches()

    trainer.eval_iterator = eval_iterator

  write_error = os.environ.get("FAULT_WRITE_ERROR")
  if write_error:
    install_write_error(*(int(x) for x in write_error.split("@")))


def install_write_error(code: int, nth: int = 2) -> None:
  """The `nth` checkpoint save fails part-way with OSError(code) (also used in-process by the tests)."""
  import orbax.checkpoint as ocp
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
  calls = {"data": 0}

  async def save_fn(self, item, directory):
    if isinstance(item, dict) and "iterators" in item:  # the `data` item: the arrays are being written now
      calls["data"] += 1
      if calls["data"] == nth:
        raise OSError(code, os.strerror(code), str(directory / "metadata"))
    return await original(self, item, directory)

  ocp.JsonCheckpointHandler._save_fn = save_fn  # pylint: disable=protected-access


if __name__ == "__main__":
  install_faults()
  from vit_jax import main
  sys.argv[0] = "vit_jax.main"
  main.run()
