r"""Fine-tuning a pretrained ViT, the official recipe (google-research/vision_transformer).

  python -m vit_jax.main --config=configs/vit_finetune.py:model=ViT-B_16,dataset=cifar10 \
      --config.pretrained=vit_models/imagenet21k/ViT-B_16 --workdir=/tmp/b16_cifar10

  python -m vit_jax.main --config=configs/vit_finetune.py:cifar100 ...   # a bare preset name = dataset=

`pretrained`: a catalogue name (downloaded once into the cache; vit_jax.list_pretrained()), a URI or a file.
It has no default here: a fine-tuning run names its checkpoint, or says `--config.pretrained=scratch`
(the official code fails when its .npz is missing rather than train from random weights; so does this recipe).

SGD with momentum 0.9, global-norm clipping at 1.0, no weight decay, batch 512,
linear warm-up then cosine decay to 0, 384 px (position embeddings resized
bilinearly from the checkpoint's grid), zero-initialised head of the new class
count.  Steps and splits per data set as the official DATASET_PRESETS and
big_vision's transfer.py; lr 0.03 (0.01 for ViT-B_16 on CIFAR-10 as the official config).
Reference: ViT-B_16 (i21k) reaches 99.02% on CIFAR-10 and 92.06% on CIFAR-100 with this recipe.
"""
import difflib

import ml_collections

from vit_jax.train import config_base

# dataset -> (train split, eval split, total steps, warmup steps)
DATASETS = {
    "cifar10": ("train[:98%]", "test", 10_000, 500),
    "cifar100": ("train[:98%]", "test", 10_000, 500),
    "imagenet2012": ("train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": ("train", "test", 500, 100),
    "oxford_flowers102": ("train", "test", 500, 100),
}


def _bare_dataset(arg):
  """`cifar10` (a bare preset name, where a bare value would be the model) -> `dataset=cifar10`; a bare value
  that is neither a model nor a preset fails with the likely meaning."""
  if not arg:
    return arg
  first, *rest = arg.split(",")
  if "=" in first:
    return arg
  if first in DATASETS:
    return ",".join([f"dataset={first}"] + rest)
  from vit_jax.models import registry
  models = registry.list_models()
  if first not in models:
    close = difflib.get_close_matches(first, list(DATASETS), n=1, cutoff=0.6)
    if close:
      raise ValueError(f"configs/vit_finetune.py:{arg}: {first!r} is not a model; did you mean "
                       f"dataset={close[0]}? (presets: {sorted(DATASETS)})")
    raise registry.unknown_name_error("model", first, models)
  return arg


def get_config(arg=None):
  args = config_base.parse_args(_bare_dataset(arg), model="ViT-B_16", dataset="cifar10", image_size=384,
                                dropout=0.0)
  if args.dataset not in DATASETS:
    raise ValueError(f"no fine-tuning preset for dataset {args.dataset!r}; presets: {sorted(DATASETS)} "
                     "(any other TFDS name: start from one and set --config.dataset and the splits).")
  c = config_base.base_config()
  c.model = ml_collections.ConfigDict(dict(name=args.model, dropout_rate=args.dropout))
  c.dataset = args.dataset
  c.train_split, c.eval_split, c.total_steps, c.warmup_steps = DATASETS[args.dataset]
  c.image_size = args.image_size
  c.input = ml_collections.ConfigDict(dict(crop="inception", normalization="minus_one_one"))
  c.input_eval = ml_collections.ConfigDict(dict(crop="resize", normalization="minus_one_one"))
  c.batch_size = 512
  c.eval_batch_size = 512
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.lr = 0.01 if (args.model == "ViT-B_16" and args.dataset == "cifar10") else 0.03
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.decay_type = "cosine"
  c.pretrained = None  # must be given: a checkpoint to fine-tune, or "scratch"
  c.checkpoint_every = 1000
  c.eval_every = 1000
  return c
