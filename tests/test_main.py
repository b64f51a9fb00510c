"""The command line end to end: multi-process runs, errors (SIGTERM/SIGKILL resume: tests/test_faults.py)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vit_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_command(workdir, *overrides, config="configs/testing.py"):
  return [sys.executable, "-m", "vit_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def read_metrics(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def losses_by_step(lines):
  return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


def committed_steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


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


def test_default_job_on_two_processes_exits_cleanly(tmp_path):
  """The README's default job (configs/digits.py) on 2 processes, to the end: both processes restore the
  checkpoint for the predictions (Orbax synchronises them: all take part), process 0 prints, both exit 0."""
  # The free port launch/local.sh picks is taken by another program before the coordinator binds it
  # (a stand-in for PYTHON hands out a busy port the first time): the start is retried on another port.
  import socket
  busy = socket.socket(socket.AF_INET6)
  busy.bind(("::", 0))
  busy.listen()
  shim = tmp_path / "python"
  shim.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ] && [ ! -e {tmp_path}/port_handed_out ]; then
  case "$2" in *getsockname*) touch {tmp_path}/port_handed_out; echo {busy.getsockname()[1]}; exit 0;; esac
fi
exec {sys.executable} "$@"
""")
  shim.chmod(0o755)
  cmd = ["bash", "launch/local.sh", "2", "--", "--config=configs/digits.py", "--config.total_steps=10",
         "--config.warmup_steps=2", "--config.checkpoint_every=10", "--config.eval_every=10",
         f"--workdir={tmp_path / 'run'}", f"--config.data_dir={tmp_path / 'tfds'}"]
  try:
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHON=str(shim)), capture_output=True,
                            text=True, timeout=400)
  finally:
    busy.close()
  out = result.stdout + result.stderr
  assert result.returncode == 0, out[-4000:]
  assert "was taken before the coordinator could bind it; retrying with another" in result.stderr
  assert "Fatal Python error" not in out
  assert "Traceback" not in result.stdout[result.stdout.index("parameters | mesh"):]  # the run that started
  assert "[0] eval at step 10: top-1" in out and "over 359 examples" in out
  assert "[0] Predictions of the restored checkpoint (ViT-Ti_16, digits/test):" in out
  assert len([line for line in out.splitlines() if line.startswith("[0]   example ")]) == 8
  assert not any(line.startswith("[1]   example ") for line in out.splitlines())
  assert committed_steps(tmp_path / "run") == [10]


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


def test_conftest_keeps_a_users_xla_flags_and_still_gives_8_devices():
  import conftest  # tests/ is on sys.path under pytest
  flags = conftest._test_xla_flags("--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2")
  assert flags.split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=8",
                           "--xla_backend_optimization_level=0"]
  assert "--xla_backend_optimization_level=2" in conftest._test_xla_flags("--xla_backend_optimization_level=2")
  import jax
  assert jax.device_count() == 8


def test_busy_coordinator_port_is_refused_in_words():
  """A taken coordinator port crashes JAX's coordinator service (segfault); process 0 refuses it first."""
  import socket
  from vit_jax.train import multihost
  busy = socket.socket(socket.AF_INET6)
  busy.bind(("::", 0))
  busy.listen()
  port = busy.getsockname()[1]
  try:
    with pytest.raises(ValueError, match=f"coordinator port {port} is already in use"):
      multihost.check_coordinator_port_free(f"127.0.0.1:{port}")
  finally:
    busy.close()
  multihost.check_coordinator_port_free(f"127.0.0.1:{port}")  # free again: no error
