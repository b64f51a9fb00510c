"""Nothing lost under faults: random SIGKILLs (also during an asynchronous save and during evaluation),
a checkpoint write that fails part-way, checkpoints that cannot be restored, a second run on one
workdir, and a resume with another number of processes.

The kill test's length: VIT_JAX_FAULT_KILLS kills (default 4) of a VIT_JAX_FAULT_STEPS-step run (default 40);
a longer soak by hand:
  VIT_JAX_FAULT_KILLS=30 VIT_JAX_FAULT_STEPS=240 VIT_JAX_FAULT_SEED=1 \
      .venv/bin/python -m pytest -q -s tests/test_faults.py -k sigkill
"""
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import vit_jax
from vit_jax.train import checkpoint as ckpt_lib
from vit_jax.train import lock as lock_lib
from vit_jax.train import optim, sharding as shd, state as state_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
KILLS = int(os.environ.get("VIT_JAX_FAULT_KILLS", "4"))
STEPS = int(os.environ.get("VIT_JAX_FAULT_STEPS", "40"))


def read_metrics(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def committed_steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def env_with(tmp_path, **extra):
  """Runs share compiled executables (JAX's persistent cache): one compile, not one per run."""
  return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
              **{k: str(v) for k, v in extra.items()})


def run_and_kill(cmd, env, trigger, delay, timeout=300):
  """Starts `cmd`; SIGKILLs it `delay` s after the first output line for which `trigger(line)` holds.
  Returns (return code, output, whether the kill was sent)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, killed = "", False
  deadline = time.time() + timeout
  for line in proc.stdout:
    out += line
    if trigger(line):
      time.sleep(delay)
      proc.kill()
      killed = True
      break
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"timeout:\n{out[-3000:]}")
  out += proc.communicate(timeout=timeout)[0]
  return proc.returncode, out, killed


# ----------------------------------------------------------------------------- random SIGKILLs


def test_sigterm_and_random_sigkills_resume_exactly(tmp_path):
  """A tiny digits run is preempted (SIGTERM: it saves and exits cleanly), then SIGKILLed KILLS times in a
  row at random moments (one during an asynchronous save, one during evaluation, the others at a random
  step) and resumed after each; every logged loss and evaluation and the final parameters equal those of a
  run that never stopped.  What is asserted is what was saved, not which of kill and exit came first."""
  seed = int(os.environ.get("VIT_JAX_FAULT_SEED", "0"))
  rng = np.random.default_rng(seed)
  total = STEPS
  flags = ["--config=configs/digits.py", f"--config.data_dir={tmp_path / 'tfds'}", f"--config.total_steps={total}",
           "--config.warmup_steps=4", "--config.checkpoint_every=8", "--config.eval_every=16",
           "--config.log_every=1", "--config.progress_secs=0", "--config.num_predictions=0",
           "--config.mesh.data=2"]
  command = lambda workdir: [sys.executable, str(DRIVER), f"--workdir={workdir}", *flags]  # noqa: E731
  started = time.time()
  reference = subprocess.run(command(tmp_path / "reference"), cwd=ROOT, env=env_with(tmp_path),
                             capture_output=True, text=True, timeout=400)
  assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
  ref_lines = read_metrics(tmp_path / "reference")
  ref_loss = {r["step"]: r["train_loss"] for r in ref_lines if "train_loss" in r}
  ref_eval = {r["step"]: r["eval_accuracy"] for r in ref_lines if "eval_accuracy" in r}
  assert sorted(ref_loss) == list(range(1, total + 1)) and sorted(ref_eval) == sorted({*range(16, total, 16), total})

  workdir = tmp_path / "run"
  # Preemption as soon as the run has started: it saves the step it is in and exits with 0.
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env_with(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = ""
  for line in proc.stdout:
    out += line
    if "parameters | mesh" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out += proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "Preempted (SIGTERM) at step" in out, out[-3000:]
  assert 0 < committed_steps(workdir)[-1] < total
  kinds = (["save", "eval"] + ["random"] * KILLS)[:KILLS]
  landed, report = 0, []
  for attempt, kind in enumerate(kinds):
    resume_from = max(committed_steps(workdir), default=0)
    if resume_from >= total:  # the end is published: nothing left to kill
      break
    if kind == "save":
      env, trigger = env_with(tmp_path, FAULT_SLOW_COMMIT=0.5), lambda line: line.startswith("FAULT-POINT commit")
    elif kind == "eval":
      env, trigger = env_with(tmp_path, FAULT_SLOW_EVAL=0.5), lambda line: line.startswith("FAULT-POINT eval")
    else:
      target = int(rng.integers(resume_from + 1, min(total, resume_from + 24) + 1))  # a step of this attempt
      env = env_with(tmp_path)
      trigger = lambda line, t=target: bool(re.match(r"step (\d+)/", line)) and \
          int(re.match(r"step (\d+)/", line).group(1)) >= t  # noqa: E731
    rc, out, killed = run_and_kill(command(workdir), env, trigger, delay=float(rng.uniform(0.0, 0.3)))
    assert rc in (0, -signal.SIGKILL), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    if resume_from:
      assert f"Resumed from the checkpoint at step {resume_from}" in out, out[-3000:]
    landed += rc == -signal.SIGKILL
    steps = [int(m) for m in re.findall(r"^step (\d+)/", out, re.M)]
    report.append(f"{kind}: resumed at {resume_from}, killed at step {max(steps, default=0)}")
    # What a kill may leave: published checkpoints that all restore (never a half-written one) ...
    assert not (workdir / "checkpoints_corrupt").exists()
    if rc == 0:  # ... or, when the run won the race, a finished run.
      break
  final = subprocess.run(command(workdir), cwd=ROOT, env=env_with(tmp_path), capture_output=True, text=True,
                         timeout=400)
  assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
  elapsed = time.time() - started
  print(f"\n{landed} of {len(kinds)} SIGKILLs landed ({'; '.join(report)}); {elapsed:.0f} s in all")
  assert landed >= 2, report  # the kills during the save and the evaluation are not racy (0.5 s windows)

  lines = read_metrics(workdir)
  losses = [(r["step"], r["train_loss"]) for r in lines if "train_loss" in r]
  assert sorted({s for s, _ in losses}) == list(range(1, total + 1))
  for step, loss in losses:  # every logged loss, also those of killed runs past their last checkpoint
    assert loss == ref_loss[step], (step, loss, ref_loss[step])
  for r in lines:
    if "eval_accuracy" in r:
      assert r["eval_accuracy"] == ref_eval[r["step"]], r
  assert committed_steps(workdir)[-1] == total
  assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())  # TensorBoard
  assert not list((workdir / "checkpoints").glob("*tmp*"))  # half-written saves were cleaned up
  _, ref_vars, _ = vit_jax.restore(str(tmp_path / "reference"))
  _, got_vars, _ = vit_jax.restore(str(workdir))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref_vars, got_vars)


# ----------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_checkpoint_write_keeps_the_previous_and_names_the_directory(tmp_path, load_config, code):
  """The second save fails part-way (OSError from the checkpoint writer while the arrays are written): the run
  stops with an error naming the directory, the cause and the free space; checkpoint 1 still restores."""
  sys.path.insert(0, str(ROOT / "tests"))
  import fault_driver
  import orbax.checkpoint as ocp
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
  config = load_config()
  config.total_steps, config.checkpoint_every, config.eval_every, config.mesh.data = 6, 2, 0, 1
  try:
    fault_driver.install_write_error(code, nth=2)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
      trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    ocp.JsonCheckpointHandler._save_fn = original  # pylint: disable=protected-access
  message = str(info.value)
  assert f"[Errno {code}]" in message and str(tmp_path / "checkpoints") in message
  assert re.search(r"Free space on that file system: [\d.]+ GiB free of [\d.]+ GiB", message)
  assert "previous checkpoint (step 2) is intact" in message
  assert committed_steps(tmp_path) == [2]
  # What the next run resumes from: step 2, intact (its checksums are verified).  (The next run is a new
  # process in real life; here the failed save's array writes may still be finishing in this one.)
  setup = trainer.validate(config)
  _, data_state, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(setup.abstract_state, config)
  assert step == 2 and data_state == {"step": 2, "order": "global"}


# ----------------------------------------------------------------------------- unrestorable checkpoints


@pytest.fixture(scope="module")
def small(load_config, initial_variables):
  config = load_config()
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  state = state_lib.create_train_state(model, tx, mesh, 0, initial_variables(config))
  abstract, _ = state_lib.state_shardings(model, tx, mesh)
  return config, model, tx, mesh, state, abstract


def save_steps(workdir, small, steps):
  config, _, _, _, state, _ = small
  saver = ckpt_lib.Checkpointer(str(workdir))
  for s in steps:
    saver.save(s, state.replace(step=state.step + s), {"position": s}, config)
  saver.close()


def array_files(workdir, step):
  files = [p for p in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and "/d/" in str(p)]
  return sorted(files, key=lambda p: p.stat().st_size)


def test_only_provably_corrupt_checkpoints_are_set_aside(tmp_path, small, monkeypatch):
  config, _, _, _, _, abstract = small
  save_steps(tmp_path, small, [1, 2, 3])
  # Step 3 lost its commit marker (a save that never finished), step 2 has a flipped byte in an array file
  # (only the checksum sees it): both are set aside, step 1 is used.
  (tmp_path / "checkpoints" / "3" / ckpt_lib.COMMIT_MARKER).unlink()
  biggest = array_files(tmp_path, 2)[-1]
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x01
  biggest.write_bytes(bytes(data))
  restored, data_state, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config)
  assert step == 1 and data_state == {"position": 1}
  assert sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) == ["2", "3"]

  # A permission problem (or any error that does not prove corruption) stops, naming the checkpoint; nothing moves.
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  def denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "checkpoints" / "1" / "state"))
  monkeypatch.setattr(checkpointer.manager, "restore", denied)
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match=r"(?s)Checkpoint 1 in .* cannot be restored: "
                     r"PermissionError.*restart_from_scratch=true"):
    checkpointer.restore(abstract, config)
  assert committed_steps(tmp_path) == [1]


def test_a_model_changed_by_a_code_edit_is_not_a_corrupt_checkpoint(tmp_path, small, load_config):
  config, _, tx, mesh, _, _ = small
  save_steps(tmp_path, small, [1])
  edited = load_config()
  edited.model.mlp_dim = 128  # the same config, but the code now builds other shapes
  abstract, _ = state_lib.state_shardings(trainer.build_model(edited), tx, mesh)
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match=r"(?s)Checkpoint 1 .* cannot be restored: .*shape"):
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config)
  assert committed_steps(tmp_path) == [1] and not (tmp_path / "checkpoints_corrupt").exists()


def test_never_from_scratch_unless_told(tmp_path, small):
  config, _, _, _, _, abstract = small
  save_steps(tmp_path, small, [1, 2])
  for step in (1, 2):  # truncated array files
    for f in array_files(tmp_path, step):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ckpt_lib.NoRestorableCheckpointError, match="restart_from_scratch=true"):
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config)
  assert committed_steps(tmp_path) == [] and sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) \
      == ["1", "2"]
  # The next start still refuses: the set-aside checkpoints count.
  with pytest.raises(ckpt_lib.NoRestorableCheckpointError):
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config)
  told = config.copy_and_resolve_references()
  told.restart_from_scratch = True
  assert ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, told) is None
  moved = list((tmp_path / "checkpoints_unrestorable").iterdir())
  assert len(moved) == 1 and sorted(p.name for p in moved[0].iterdir()) == ["1", "2"]  # nothing deleted
  assert ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config) is None  # a fresh start from now on


def test_the_data_position_survives_another_process_count(caplog):
  glob = {"order": "global", "epoch": 1, "position": 256, "batches": 9, "offset": 0}
  state = ckpt_lib.Checkpointer._data_state(5, {"iterators": [dict(glob, process_index=i) for i in range(2)]})
  assert state["position"] == 256 and state["order"] == "global"
  stream = [{"order": "per_process", "epoch": 0, "position": 80, "batches": 9, "process_index": i} for i in range(2)]
  assert ckpt_lib.Checkpointer._data_state(5, {"iterators": stream}) is None
  assert "record stream split per process" in caplog.text and "restarts from the beginning" in caplog.text


# ----------------------------------------------------------------------------- one run per workdir


def test_second_run_on_a_workdir_refuses_and_a_killed_one_leaves_no_stuck_lock(tmp_path, load_config):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from vit_jax.train import lock; "
       "lock.WorkdirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)",
       str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = load_config()
    with pytest.raises(lock_lib.WorkdirLockedError, match=rf"host '.+', PID {holder.pid} .*--workdir"):
      trainer.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  # SIGKILL: no clean-up ran, the lock file names a dead process; the next run takes it over.
  assert json.loads((tmp_path / "lock").read_text())["pid"] == holder.pid
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert lock.took_over["pid"] == holder.pid
  lock.release()
  assert not (tmp_path / "lock").exists()


def test_stale_lock_of_another_host(tmp_path):
  path = tmp_path / "lock"
  fresh = {"host": "other-host", "pid": 4242, "started": time.time(), "heartbeat": time.time()}
  path.write_text(json.dumps(fresh))
  with pytest.raises(lock_lib.WorkdirLockedError, match="host 'other-host', PID 4242"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  path.write_text(json.dumps(dict(fresh, heartbeat=time.time() - 2 * lock_lib.STALE_SECS)))
  lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert lock.took_over["host"] == "other-host"
  assert json.loads(path.read_text())["pid"] == os.getpid()
  lock.release()


# ----------------------------------------------------------------------------- another process count


def test_resume_on_another_process_count_continues_the_example_order(tmp_path, load_config):
  """Checkpoint written by 1 process (2 devices), resumed by 2 processes (1 device each, launch/local.sh):
  the global example order continues exactly, so steps 6..10 log the uninterrupted run's losses."""
  config = load_config("digits")
  config.data_dir = str(tmp_path / "tfds")
  config.total_steps, config.warmup_steps, config.checkpoint_every, config.eval_every = 10, 2, 5, 10
  config.num_predictions, config.mesh.data, config.log_every = 0, 2, 1
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  one = {r["step"]: r["train_loss"] for r in read_metrics(tmp_path / "run") if "train_loss" in r}
  assert committed_steps(tmp_path / "run") == [5, 10]
  import shutil
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "10")  # as if preempted after step 5's checkpoint
  cmd = ["bash", "launch/local.sh", "2", "--", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
         f"--config.data_dir={tmp_path / 'tfds'}", "--config.total_steps=10", "--config.warmup_steps=2",
         "--config.checkpoint_every=5", "--config.eval_every=10", "--config.num_predictions=0",
         "--config.log_every=1"]
  result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=400)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "written by 1 process(es), this run has 2: the data set is read in one global order" in result.stdout
  assert "Resumed from the checkpoint at step 5" in result.stdout
  lines = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r]
  resumed = {r["step"]: r["train_loss"] for r in lines[10:]}
  assert sorted(resumed) == [6, 7, 8, 9, 10]
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)], [one[s] for s in range(6, 11)], rtol=1e-5)


# ----------------------------------------------------------------------------- evaluation covers the split


def test_evaluation_reports_its_coverage_and_fails_when_examples_are_lost(load_config, monkeypatch):
  from vit_jax.train import step as step_lib
  config = load_config()
  config.mesh.data = 1
  setup = trainer.validate(config)
  state = trainer.initial_state(config, setup)
  eval_step = step_lib.make_eval_step(setup.model, setup.mesh, setup.shardings)
  result = trainer.evaluate(eval_step, state, config, setup)
  assert result["eval_examples"] == 256 and result["eval_skipped"] == 0
  monkeypatch.setattr(setup.source, "num_examples", lambda split: 300)  # the split is bigger than what was read
  with pytest.raises(ValueError, match=r"evaluation covered 256 examples .*\+ 0 undecodable.* the split has 300"):
    trainer.evaluate(eval_step, state, config, setup)
