"""The command line end to end: exact resume after SIGTERM and SIGKILL, multi-process, errors."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vit_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_command(workdir, *overrides, config="configs/testing.py"):
  return [sys.executable, "-m", "vit_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def start(cmd, env=None):
  env = dict(env or os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cached_compile_env(cache_dir):
  """Runs of the same program share compiled executables (JAX's persistent cache): one compile, not four."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def read_metrics(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def losses_by_step(lines):
  return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


def committed_steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_resume_after_sigterm_and_sigkill_gives_the_same_losses(tmp_path):
  """Preempt (SIGTERM), restart, kill (SIGKILL) after a checkpoint, restart: the same per-step losses."""
  total = 40
  digits = "configs/testing.py:dataset=digits"
  flags = [f"--config.data_dir={tmp_path / 'tfds'}", f"--config.total_steps={total}", "--config.checkpoint_every=10",
           "--config.eval_every=0", "--config.mesh.data=2", "--config.mesh.fsdp=2"]

  env = cached_compile_env(tmp_path / "jax_cache")
  # Reference: one uninterrupted run (it also prepares the digits data set).
  result = subprocess.run(main_command(tmp_path / "reference", *flags, config=digits), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  ref_lines = read_metrics(tmp_path / "reference")
  ref = losses_by_step(ref_lines)
  assert sorted(ref) == list(range(1, total + 1))
  ref_accuracy = [r for r in ref_lines if "eval_accuracy" in r][-1]["eval_accuracy"]

  workdir = tmp_path / "run"
  # 1) SIGTERM as soon as the run has started: it saves at the step it is in and exits cleanly.
  proc = start(main_command(workdir, *flags, config=digits), env)
  out = ""
  for line in proc.stdout:
    out += line
    if "parameters | mesh" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out += proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert "Preempted (SIGTERM) at step" in out
  first_stop = committed_steps(workdir)
  assert first_stop and first_stop[-1] < total

  # 2) Resume; SIGKILL once a later checkpoint is on disk (no chance to clean up).
  proc = start(main_command(workdir, *flags, config=digits), env)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(s >= 10 and s > first_stop[-1] for s in committed_steps(workdir)):
      proc.kill()
      break
    time.sleep(0.02)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (rc {proc.returncode}):\n{out}"
  assert "Resumed from the checkpoint at step" in out
  killed_at = committed_steps(workdir)[-1]
  assert killed_at < total

  # 3) Resume to the end.
  proc = start(main_command(workdir, *flags, config=digits), env)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert f"Resumed from the checkpoint at step {killed_at}" in out

  lines = read_metrics(workdir)
  resumed = losses_by_step(lines)
  assert sorted(resumed) == list(range(1, total + 1))
  # Every logged loss, also those of the killed run past its last checkpoint, equals the reference's.
  for r in lines:
    if "train_loss" in r:
      np.testing.assert_allclose(r["train_loss"], ref[r["step"]], rtol=1e-6, err_msg=f"step {r['step']}")
  final = [r for r in lines if "eval_accuracy" in r][-1]
  assert final["step"] == total
  assert final["eval_accuracy"] == pytest.approx(ref_accuracy, abs=1e-9)
  assert (workdir / "checkpoints" / str(total)).is_dir()
  assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())  # TensorBoard


def test_two_processes_equal_one(tmp_path, load_config):
  """2 processes x 2 devices (launch/local.sh, gloo) == 1 process x 4 devices: same losses and accuracy."""
  steps = 6
  config = load_config()
  config.total_steps, config.mesh.data, config.eval_every, config.checkpoint_every = steps, 4, steps, steps
  config.eval_batch_size = 48  # 256 eval examples: the 6th batch is padded (masked) on both processes
  one = trainer.train_and_evaluate(config, str(tmp_path / "one"))
  one_losses = losses_by_step(read_metrics(tmp_path / "one"))

  cmd = ["bash", "launch/local.sh", "2", "--devices-per-process", "2", "--",
         "--config=configs/testing.py", f"--workdir={tmp_path / 'two'}", f"--config.total_steps={steps}",
         f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}", "--config.eval_batch_size=48"]
  env = dict(os.environ, PYTHON=sys.executable)
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "2 process(es)" in result.stdout and "mesh data=4 x fsdp=1 x tensor=1 (4 devices)" in result.stdout
  assert f"eval at step {steps}: top-1" in result.stdout and "over 256 examples" in result.stdout
  assert one["eval_examples"] == 256
  lines = read_metrics(tmp_path / "two")  # written by process 0 only: one line per logged step
  two_losses = losses_by_step(lines)
  assert len([r for r in lines if "train_loss" in r]) == steps
  assert sorted(two_losses) == sorted(one_losses) == list(range(1, steps + 1))
  np.testing.assert_allclose([two_losses[s] for s in range(1, steps + 1)],
                             [one_losses[s] for s in range(1, steps + 1)], rtol=1e-5)
  two_eval = [r for r in lines if "eval_accuracy" in r][-1]
  assert two_eval["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-9)
  assert committed_steps(tmp_path / "two") == [steps]


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path, load_config):
  config = load_config()
  config.optimizer, config.lr, config.warmup_steps, config.grad_clip_norm = "sgd", 1e12, 0, 0.0
  config.checkpoint_every, config.mesh.data = 1, 1
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+); stopping\. the last good checkpoint "
                                                       r"is step \d+ in .*checkpoints"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("flag, message", [
    ("--config.batchsize=8", "batchsize"),
    ("--config.model.name=ViT-B16", "Did you mean 'ViT-B_16'"),
])
def test_cli_rejects_unknown_keys_and_names(tmp_path, flag, message):
  result = subprocess.run(main_command(tmp_path, flag), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()
