r"""A seconds-long smoke run: a tiny ViT on synthetic data (no data set needed).

  python -m vit_jax.main --config=configs/testing.py --workdir=/tmp/smoke
  python -m vit_jax.main --config=configs/testing.py:dataset=digits --workdir=/tmp/smoke_digits

Used by the tests (mesh equivalence, resume, multi-process) and handy to check
an installation or a new machine.
"""
import ml_collections

from vit_jax.train import config_base


def get_config(arg=None):
  args = config_base.parse_args(arg, dataset="synthetic")
  c = config_base.base_config()
  c.model = ml_collections.ConfigDict(dict(
      name="ViT-Ti_16", patch_size=2, hidden_size=32, depth=1, mlp_dim=64, num_heads=2))
  c.dataset = args.dataset
  c.train_split, c.eval_split = "train", "test"
  c.num_classes = 10 if args.dataset == "synthetic" else -1
  c.image_size = 8
  c.input = ml_collections.ConfigDict(dict(crop="resize", flip=False) if args.dataset != "synthetic" else {})
  c.batch_size = 16
  c.eval_batch_size = 64
  c.total_steps = 20
  c.optimizer = "adamw"
  c.lr = 3e-3
  c.weight_decay = 1e-2
  c.warmup_steps = 2
  c.checkpoint_every = 10
  c.eval_every = 20
  c.log_every = 1
  c.progress_secs = 0.0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
