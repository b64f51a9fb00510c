r"""Pre-training ViT from scratch: the ViT paper and AugReg recipes.

  python -m vit_jax.main --config=configs/vit_pretrain.py:recipe=i21k,model=ViT-B_16 --workdir=...
  python -m vit_jax.main --config=configs/vit_pretrain.py:recipe=augreg_i1k,model=ViT-B_16,aug=medium2 ...

recipe:
  i21k        ViT paper / maintainers (vision_transformer#2): ImageNet-21k, 90 epochs, batch 4096,
              Adam(0.9, 0.999), lr 1e-3, 10k warm-up, linear decay to 1e-5, weight decay 0.03,
              dropout 0.1, clip 1.0, representation layer, head bias -10.
  i1k         ViT paper, ImageNet-1k from scratch: 300 epochs, batch 4096, Adam, lr 3e-3,
              weight decay 0.3, 10k warm-up, cosine, dropout 0.1, clip 1.0.
  augreg_i1k  AugReg (big_vision vit_i1k.py): 300 epochs, batch 4096, AdamW lr 1e-3, wd 1e-4 x lr schedule,
              10k warm-up, cosine, clip 1.0, RandAugment + mixup by `aug` preset, dropout/stochastic
              depth 0.1 for `aug` != none.
  augreg_i21k AugReg on ImageNet-21k: 300 epochs as augreg_i1k with wd 0.03.
aug: none, light1, light2, medium1, medium2, strong1, strong2 (big_vision MIXUP_DEF / RANDAUG_DEF).
"""
import ml_collections

from vit_jax.train import config_base

MIXUP = {"none": 0.0, "light1": 0.0, "light2": 0.2, "medium1": 0.2, "medium2": 0.5, "strong1": 0.5, "strong2": 0.8}
LARGE = ("ViT-L", "ViT-H", "R50+ViT-L")  # models whose training step gets remat by default
RANDAUG = {"none": None, "light1": (2, 0), "light2": (2, 10), "medium1": (2, 15), "medium2": (2, 15),
           "strong1": (2, 20), "strong2": (2, 20)}

# Settable from the command line (e.g. for a pod: --config.model.dtype=bfloat16 --config.model.scan=True
# --config.model.remat=True; `python -m vit_jax.aot` checks what they cost); these values are the model's defaults.
POD_OPTIONS = dict(dtype="float32", scan=False, remat=False, remat_policy="nothing_saveable")


def get_config(arg=None):
  args = config_base.parse_args(arg, recipe="i21k", model="ViT-B_16", aug="none", batch_size=4096)
  recipes = ("i21k", "i1k", "augreg_i1k", "augreg_i21k")
  if args.recipe not in recipes:
    raise ValueError(f"unknown recipe {args.recipe!r}; choose one of {recipes}.")
  if args.aug not in MIXUP:
    raise ValueError(f"unknown aug preset {args.aug!r}; choose one of {sorted(MIXUP)}.")
  c = config_base.base_config()
  i21k = args.recipe.endswith("i21k")
  c.dataset = "imagenet21k" if i21k else "imagenet2012"
  c.train_split, c.eval_split = ("full[51200:]", "full[:51200]") if i21k else ("train[:99%]", "validation")
  c.image_size = 224
  c.batch_size = c.eval_batch_size = args.batch_size
  # Epochs of the train split (its size is read from the data set at start).
  c.total_steps, c.total_epochs = None, 90 if args.recipe == "i21k" else 300
  c.warmup_steps = 10_000
  c.grad_clip_norm = 1.0
  c.b1, c.b2 = 0.9, 0.999
  c.input = ml_collections.ConfigDict(dict(crop="inception", normalization="minus_one_one"))
  c.input_eval = ml_collections.ConfigDict(dict(crop="resize_small_central_crop", normalization="minus_one_one"))
  c.model = ml_collections.ConfigDict(dict(name=args.model, dropout_rate=0.1, **POD_OPTIONS))
  if args.recipe == "i21k":
    c.optimizer, c.lr, c.weight_decay = "adam", 1e-3, 0.03
    c.decay_type, c.linear_end = "linear", 1e-5
    c.model.head_bias_init = -10.0
  elif args.recipe == "i1k":
    c.optimizer, c.lr, c.weight_decay, c.decay_type = "adam", 3e-3, 0.3, "cosine"
  else:
    c.optimizer, c.lr, c.decay_type = "adamw", 1e-3, "cosine"
    c.weight_decay = 0.03 if i21k else 1e-4
    reg = 0.0 if args.aug == "none" else 0.1
    c.model = ml_collections.ConfigDict(dict(name=args.model, dropout_rate=reg, drop_path_rate=reg, **POD_OPTIONS))
    if RANDAUG[args.aug] is not None:
      c.input.randaugment = RANDAUG[args.aug]
    c.mixup.mixup_alpha = MIXUP[args.aug]
  if args.model.split("_")[0] in LARGE:
    # Rematerialise all but the matmul outputs of each block (benchmarks/README.md, remat table): a 16 GiB
    # budget then holds ViT-L/16 at 6x the batch (48 vs 8 images, bfloat16) while the backward pass
    # recomputes only the cheap element-wise ops; nothing_saveable (22x) recomputes the whole forward.
    c.model.remat = True
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  c.checkpoint_every = 5000
  c.eval_every = 5000
  c.log_every = 50
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # ZeRO-3 over all devices on pods
  return c
