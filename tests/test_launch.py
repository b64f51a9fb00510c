"""launch/tpu_pod.sh (through --dry-run) and launch/slurm.sbatch (under a stand-in srun, for real)."""
import os
import pathlib
import random
import socket
import subprocess
import sys

import numpy as np

from test_main import losses_by_step, read_metrics
from vit_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ["bash", "launch/tpu_pod.sh"]
SITE = ["--name", "vit-pod", "--zone", "us-west4-a", "--type", "v5litepod-256", "--version", "v2-alpha-tpuv5-lite"]


def _dry(*args):
  out = subprocess.run(POD + ["--dry-run"] + list(args), cwd=ROOT, capture_output=True, text=True, timeout=30)
  return out.returncode, out.stdout.splitlines(), out.stderr


def test_tpu_pod_dry_run_prints_every_command():
  rc, lines, err = _dry("all", "delete", *SITE, "--spot", "--queued", "--",
                        "--config=configs/vit_pretrain.py:recipe=i21k,model=ViT-B_16", "--workdir=gs://b/runs/b16")
  assert rc == 0, err
  ssh = "gcloud compute tpus tpu-vm ssh vit-pod --zone=us-west4-a --worker=all '--command="
  assert lines == [
      "gcloud compute tpus queued-resources create vit-pod-qr --node-id=vit-pod --zone=us-west4-a "
      "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --spot",
      "gcloud compute tpus queued-resources describe vit-pod-qr --zone=us-west4-a '--format=value(state.state)'",
      "tar czf /tmp/vit_jax_code.tgz -T '<(git ls-files)'",
      "gcloud compute tpus tpu-vm scp /tmp/vit_jax_code.tgz 'vit-pod:~/vit_jax_code.tgz' --zone=us-west4-a --worker=all",
      ssh + "rm -rf ~/vit_jax && mkdir -p ~/vit_jax && tar xzf ~/vit_jax_code.tgz -C ~/vit_jax'",
      ssh + "cd ~/vit_jax && python3 -m pip install -q -e \".[tpu]\"'",
      ssh + "cd ~/vit_jax && nohup python3 -m vit_jax.main --config=configs/vit_pretrain.py:recipe=i21k,model=ViT-B_16"
      " --workdir=gs://b/runs/b16 > ~/train.log 2>&1 &'",
      "gcloud compute tpus tpu-vm ssh vit-pod --zone=us-west4-a --worker=0 '--command=tail -n +1 -F ~/train.log'",
      "gcloud compute tpus queued-resources delete vit-pod-qr --zone=us-west4-a --force --quiet",
  ]
  rc, lines, _ = _dry("create", "delete", *SITE, "--reserved", "--project", "my-proj")
  assert lines == ["gcloud compute tpus tpu-vm create vit-pod --zone=us-west4-a --project=my-proj "
                   "--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite --reserved",
                   "gcloud compute tpus tpu-vm delete vit-pod --zone=us-west4-a --project=my-proj --quiet"]


def test_tpu_pod_quotes_arguments_through_two_shells(tmp_path):
  """Each printed line, run by bash with stand-ins for gcloud and the remote shell, gives vit_jax.main exactly
  the arguments given (spaces and quotes included)."""
  args = ["--config=configs/vit_pretrain.py:recipe=i21k", "--config.data_dir=gs://b/it's a dir", "--workdir=$HOME"]
  rc, lines, err = _dry("train", "--name", "p", "--zone", "z", "--", *args)
  assert rc == 0 and len(lines) == 1, err
  (tmp_path / "gcloud").write_text(
      "#!/bin/bash\nfor a in \"$@\"; do case \"$a\" in --command=*) cmd=${a#--command=};; esac; done\n"
      "cmd=${cmd/nohup /}; cmd=${cmd%% > ~/train.log*}; cmd=${cmd/cd ~\\/vit_jax && /}\n"
      "python3() { printf '%s\\n' \"$@\"; }\neval \"$cmd\"\n")
  (tmp_path / "gcloud").chmod(0o755)
  out = subprocess.run(["bash", "-c", lines[0]], env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"),
                       capture_output=True, text=True, timeout=30)
  assert out.stdout.splitlines() == ["-m", "vit_jax.main", *args], out.stderr


def test_tpu_pod_bad_usage():
  rc, _, err = _dry("create", "--name", "p", "--zone", "z")
  assert rc == 2 and "create needs --type" in err
  rc, _, err = _dry("train", "--name", "p", "--zone", "z")
  assert rc == 2 and "train needs the arguments of vit_jax.main" in err
  rc, _, err = _dry("launch", "--name", "p", "--zone", "z")
  assert rc == 2 and "unknown argument 'launch'" in err


def _free_slurm_port() -> int:
  """A free port that SLURM's rule (61440 + SLURM_JOB_ID % 4096) can give."""
  for _ in range(50):
    port = random.randint(61440, 65535)
    with socket.socket(socket.AF_INET6) as s:
      try:
        s.bind(("::", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 61440-65535")


def test_slurm_two_tasks_equal_one_process(tmp_path, load_config):
  """launch/slurm.sbatch under a stand-in srun that starts 2 tasks with srun's variables: main detects SLURM,
  jax.distributed.initialize() finds the coordinator itself, and the losses equal 1 process x 2 devices."""
  steps = 4
  config = load_config()
  config.total_steps, config.mesh.data, config.eval_every, config.checkpoint_every = steps, 2, steps, steps
  trainer.train_and_evaluate(config, str(tmp_path / "one"))
  srun = tmp_path / "srun"
  srun.write_text("#!/bin/bash\n# srun's variables for 2 tasks on this node; options before the command dropped\n"
                  "while [[ $1 == --* ]]; do shift; done\n"
                  f"for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 \"$@\" > {tmp_path}/task$i.log 2>&1 &"
                  f" done\nwait -n && wait -n; rc=$?; cat {tmp_path}/task0.log {tmp_path}/task1.log; exit $rc\n")
  srun.chmod(0o755)
  port = _free_slurm_port()
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID=str(port - 61440),
             SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
             SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(ROOT), JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = ["bash", str(ROOT / "launch/slurm.sbatch"), "--config=configs/testing.py", f"--workdir={tmp_path / 'two'}",
         f"--config.total_steps={steps}", f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
         "--config.num_predictions=0"]
  result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "2 process(es)" in result.stdout and "mesh data=2 x fsdp=1 x tensor=1 (2 devices)" in result.stdout
  one, two = (losses_by_step(read_metrics(tmp_path / d)) for d in ("one", "two"))
  assert sorted(two) == sorted(one) == list(range(1, steps + 1))
  np.testing.assert_allclose([two[s] for s in range(1, steps + 1)], [one[s] for s in range(1, steps + 1)], rtol=1e-5)
