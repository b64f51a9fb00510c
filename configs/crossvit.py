r"""CrossViT on ImageNet-1k, the paper's recipe (DeiT recipe, CrossViT main.py).

  python -m vit_jax.main --config=configs/crossvit.py:model=CrossViT-15 --workdir=...

300 epochs (30 warm-up epochs as the README's multi-node command), batch 4096,
AdamW lr 5e-4 x batch/512 (= 4e-3 at 4096), weight decay 0.05, cosine to 1e-5,
RandAugment (m9), mixup 0.8, cutmix 1.0, label smoothing 0.1, drop-path 0.1,
240 px (224 px for the large branch), ImageNet mean/std normalisation.
"""
import ml_collections

from vit_jax.train import config_base


def get_config(arg=None):
  args = config_base.parse_args(arg, model="CrossViT-15", batch_size=4096, epochs=300, warmup_epochs=30)
  c = config_base.base_config()
  c.model = ml_collections.ConfigDict(dict(name=args.model, drop_path_rate=0.1, approximate_gelu=False))
  c.dataset = "imagenet2012"
  c.train_split, c.eval_split = "train", "validation"
  c.image_size = 240
  c.input = ml_collections.ConfigDict(dict(crop="inception", area_range=(0.08, 1.0), randaugment=(2, 9),
                                           normalization="imagenet"))
  c.input_eval = ml_collections.ConfigDict(dict(crop="resize_small_central_crop", crop_pct=0.875,
                                                normalization="imagenet"))
  c.batch_size = c.eval_batch_size = args.batch_size
  c.total_steps, c.total_epochs = None, args.epochs  # epochs of the train split, counted at start
  c.warmup_steps, c.warmup_epochs = None, args.warmup_epochs
  c.optimizer = "adamw"
  c.lr = 5e-4 * args.batch_size / 512
  c.weight_decay = 0.05
  c.decay_type = "cosine"
  c.min_lr = 1e-5
  c.grad_clip_norm = 0.0
  c.label_smoothing = 0.1
  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
  c.checkpoint_every = 625  # about every 2 epochs at batch 4096
  c.eval_every = 625
  c.log_every = 50
  return c
