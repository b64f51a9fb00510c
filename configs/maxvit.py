r"""MaxViT on ImageNet-1k, the paper's recipe (Table 12).

  python -m vit_jax.main --config=configs/maxvit.py:model=MaxViT-T --workdir=...

300 epochs, batch 4096, AdamW peak lr 3e-3, 10k warm-up steps, cosine to 1e-5,
weight decay 0.05, RandAugment (2, 15), mixup 0.8, label smoothing 0.1,
gradient clipping 1.0, stochastic depth 0.2 / 0.3 / 0.4 / 0.6 for T / S / B / L,
224 px.  BatchNorm statistics live in the train state.
"""
import ml_collections

from vit_jax.models import registry
from vit_jax.train import config_base


def get_config(arg=None):
  args = config_base.parse_args(arg, model="MaxViT-T", batch_size=4096, epochs=300)
  if args.model not in registry.list_models("maxvit"):
    raise ValueError(f"unknown MaxViT model {args.model!r}; choose one of {registry.list_models('maxvit')}.")
  c = config_base.base_config()
  # Stochastic depth as in the paper: the registry's variants carry it (T .2, S .3, B .4, L/XL .6).
  c.model = ml_collections.ConfigDict(dict(name=args.model))
  c.dataset = "imagenet2012"
  c.train_split, c.eval_split = "train[:99%]", "validation"
  c.image_size = 224
  c.input = ml_collections.ConfigDict(dict(crop="inception", area_range=(0.08, 1.0), randaugment=(2, 15),
                                           normalization="imagenet"))
  c.input_eval = ml_collections.ConfigDict(dict(crop="resize", normalization="imagenet"))
  c.batch_size = c.eval_batch_size = args.batch_size
  c.total_steps, c.total_epochs = None, args.epochs  # epochs of the train split, counted at start
  c.warmup_steps = 10_000
  c.optimizer = "adamw"
  c.lr = 3e-3
  c.weight_decay = 0.05
  c.decay_type = "cosine"
  c.min_lr = 1e-5
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.1
  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5))
  c.checkpoint_every = 5000
  c.eval_every = 5000
  c.log_every = 50
  return c
