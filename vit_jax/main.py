r"""Train or fine-tune a model:

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/vit_finetune.py:model=ViT-B_16,dataset=cifar10 \
      --config.pretrained=ViT-B_16.npz --workdir=/tmp/b16-cifar10 --config.batch_size=256

Running it again with the same --workdir resumes from the newest checkpoint.
Multi-host: on TPU pods and SLURM `jax.distributed.initialize()` finds the
cluster itself; elsewhere pass --coordinator_address, --num_processes and
--process_id (see launch/local.sh, which starts N processes on one machine).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:ARGS]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metrics.jsonl.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs without a cluster "
                    "manager; TPU pods and SLURM are detected automatically).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_distributed() -> None:
  """jax.distributed.initialize() when several processes take part; must run before JAX touches devices."""
  import jax
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    if FLAGS.process_id == 0:
      from vit_jax.train import multihost
      multihost.check_coordinator_port_free(FLAGS.coordinator_address)
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _cluster_detected():
    jax.distributed.initialize()


def print_predictions(workdir: str, config, count: int) -> None:
  """A few test predictions from the checkpoint on disk (through vit_jax.restore, as a user would).

  Every process calls it: restoring synchronises the processes (Orbax barriers), so either all take
  part or none does.  Each restores onto its own first device and predicts its own share of the first
  evaluation batch; process 0 prints.
  """
  import jax
  import numpy as np
  import vit_jax
  from vit_jax.train import trainer

  model, variables, saved = vit_jax.restore(workdir)
  if "cache" in saved.input_eval:
    saved.input_eval.cache = False  # one batch is read; a cache would be left half-filled
  batch = next(iter(trainer.eval_iterator(saved, saved.num_classes)))
  images, labels = batch["image"][:count], batch["label"][:count]
  device = jax.local_devices()[0]  # process-local: no collective, whatever the other processes do
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jax.device_put(images, device))
  probs = np.asarray(jax.nn.softmax(logits, -1))
  if jax.process_index() != 0:
    return
  print(f"Predictions of the restored checkpoint ({saved.model.name}, {saved.dataset}/{saved.eval_split}):")
  for i, (p, y) in enumerate(zip(probs, labels)):
    guess = int(np.argmax(p))
    print(f"  example {i}: label {int(y)} -> predicted {guess} (p={p[guess]:.3f})"
          + ("" if guess == int(y) else "  <- wrong"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.KEY=VALUE.")
  if not FLAGS["verbosity"].present:
    # Our progress lines say what happens; library INFO logs (Orbax, clu) only with --verbosity=0.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  import jax
  from vit_jax.train import trainer

  config = FLAGS.config
  logging.info("config:\n%s", config)
  result = trainer.train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    print(f"Done: {summary}", flush=True)
  if not result.get("preempted") and config.num_predictions:  # all processes (see print_predictions)
    print_predictions(FLAGS.workdir, config, config.num_predictions)


def run():
  # Errors a user can fix (bad config, mesh, sizes) are shown as one message, not a traceback.
  from vit_jax.train.checkpoint import CheckpointRestoreError, CheckpointWriteError, ConfigMismatchError
  from vit_jax.train.lock import WorkdirLockedError
  try:
    app.run(main)
  except (ValueError, TypeError, FileNotFoundError, ConfigMismatchError, FloatingPointError, CheckpointWriteError,
          CheckpointRestoreError, WorkdirLockedError) as e:
    if os.environ.get("VIT_JAX_TRACEBACK"):
      raise
    print(f"ERROR: {e}\n(set VIT_JAX_TRACEBACK=1 for the full traceback)", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  run()
