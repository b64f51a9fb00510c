r"""The embedded default: a tiny ViT trained from scratch on scikit-learn's digits.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits

1,797 real 8x8 hand-written digits (10 classes; 1,438 train / 359 held-out
test, vit_jax.data's `digits` TFDS builder, no download).  Runs the whole
pipeline (TFDS input, sharded train step, Orbax checkpoints, evaluation,
TensorBoard + metrics.jsonl) and reaches >= 95% test accuracy in a few minutes
on a 2-core CPU, then prints test predictions from the restored checkpoint.
"""
import ml_collections

from vit_jax.train import config_base


def get_config():
  c = config_base.base_config()
  # ViT with 2x2 patches on the 8x8 images: 16 patch tokens + the class token.
  c.model = ml_collections.ConfigDict(dict(
      name="ViT-Ti_16", patch_size=2, hidden_size=64, depth=2, mlp_dim=128, num_heads=4,
      dropout_rate=0.1, drop_path_rate=0.0))
  c.dataset = "digits"
  c.train_split, c.eval_split = "train", "test"
  c.image_size = 8
  # Digits are not mirror-symmetric and too small to crop: only resize (a no-op at 8 px).
  c.input = ml_collections.ConfigDict(dict(crop="resize", flip=False, cache=True, shuffle_buffer=2048))
  c.input_eval = ml_collections.ConfigDict(dict(cache=True))

  c.batch_size = 128
  c.eval_batch_size = 128
  c.total_steps = 1000
  c.optimizer = "adamw"
  c.lr = 2e-3
  c.weight_decay = 0.05
  c.warmup_steps = 100
  c.decay_type = "cosine"
  c.grad_clip_norm = 1.0
  # 1,438 training images: without regularisation the model memorises them (train loss ~1e-4).
  c.label_smoothing = 0.1

  c.checkpoint_every = 500
  c.eval_every = 250
  c.log_every = 50
  c.num_predictions = 8
  return c
