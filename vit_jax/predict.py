"""Top-k classes of images with a ViT-family model.

    python -m vit_jax.predict --model ViT-B_16 --weights ViT-B_16.npz cat.jpg dog.png
    python -m vit_jax.predict --model ViT-B_16 --weights model.safetensors --norm imagenet --image-size 384 x.jpg
    python -m vit_jax.predict --workdir /tmp/run x.jpg          # a checkpoint of `python -m vit_jax.main`

Weights are anything `vit_jax.load_pretrained` reads (official .npz, timm
state_dicts, ...).  The head keeps the checkpoint's class count unless
--num-classes says otherwise; heads of 1000 / 21843 classes print ImageNet
names.  Images go through the evaluation preprocessing of the input pipeline
with the input settings of the model's released weights (the family record's
`PretrainedCfg` at the model's image size: normalisation and centre crop,
e.g. [-1, 1] and a plain resize for the official ViT weights, ImageNet mean/std
and crop 0.875 for CrossViT) unless --norm / --crop / --crop-pct say otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

NORMS = ("minus_one_one", "imagenet", "none")
CROPS = ("resize", "resize_small_central_crop")


def restore(workdir: str, step: int | None = None):
  """`(model, variables, config)` of a training run's checkpoint, on this machine's devices.

      model, variables, config = vit_jax.restore(workdir)
      logits = model.apply(variables, images, train=False)

  Only params (and BatchNorm statistics) are read, replicated on the local
  devices, whatever mesh or device count the training run used.
  """
  import flax.linen as nn
  import jax
  import ml_collections
  import orbax.checkpoint as ocp
  from vit_jax.models import registry
  from vit_jax.train import checkpoint, config_base

  directory = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory}/<step>/); "
                            "train with `python -m vit_jax.main --workdir ...` first.")
  manager = ocp.CheckpointManager(directory, item_names=checkpoint.ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {directory}; available steps: {steps}.")
    config = ml_collections.ConfigDict(
        manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    model = config_base.build_model(config)
    variables = nn.meta.unbox(registry.abstract_variables(model))
    wanted = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  finally:
    manager.close()
  return model, dict(restored.state), config


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.predict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
  p.add_argument("--model", help="registered model name (see vit_jax.list_models())")
  p.add_argument("--weights", help="checkpoint: .npz, .safetensors, .pth/.bin, TF checkpoint")
  p.add_argument("--workdir", help="training workdir to restore (instead of --model/--weights)")
  p.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
  p.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's)")
  p.add_argument("--norm", choices=NORMS, help="pixel normalisation (default: the released weights')")
  p.add_argument("--crop", choices=CROPS, help="resize (official ViT) or timm-style central crop "
                                               "(default: the released weights')")
  p.add_argument("--crop-pct", type=float, help="for --crop resize_small_central_crop (default: the weights')")
  p.add_argument("--posemb-resize", choices=("bilinear", "bicubic"), help="default: the family's")
  p.add_argument("--labels", help="class-name file, one per line (overrides the ImageNet names)")
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override, e.g. approximate_gelu=False (repeatable)")
  args = p.parse_args(argv)
  if args.workdir is None and not (args.model and args.weights):
    p.error("give --model and --weights, or --workdir.")
  if args.workdir is not None and (args.model or args.weights):
    p.error("--workdir restores its own model and weights; leave out --model/--weights.")
  return args


def load_images(paths: list[str], image_size: tuple[int, int], crop: str, crop_pct: float, norm: str) -> np.ndarray:
  """Decoded, resized and normalised images [n, h, w, 3] float32 (the input pipeline's eval transform)."""
  import tensorflow as tf
  from vit_jax.data import preprocess
  decode = preprocess.make_decode_fn(train=False, image_size=image_size, crop=crop, crop_pct=crop_pct)
  out = []
  for path in paths:
    try:
      data = tf.io.read_file(path)
      image = decode(data, tf.zeros(2, tf.int32))
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      raise SystemExit(f"cannot read image {path!r}: {e.message.splitlines()[0]}")
    out.append(preprocess.normalize(image, norm).numpy())
  return np.stack(out).astype(np.float32)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the k largest softmax probabilities per row, best first."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  return order, np.take_along_axis(probs, order, axis=-1)


def input_settings(model_name: str, image_size: tuple[int, int]):
  """The `PretrainedCfg` of the model's released weights at `image_size` (else its first one)."""
  from vit_jax.models import registry
  cfgs = registry.pretrained_cfgs(model_name)
  if not cfgs:
    return registry.PretrainedCfg("none", image_size[0], crop_pct=1.0)
  return next((c for c in cfgs if (c.image_size, c.image_size) == tuple(image_size)), cfgs[0])


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  from vit_jax import labels
  from vit_jax.cli import parse_key_values
  from vit_jax.weights import core
  from vit_jax.models.layers import to_2tuple

  if args.workdir:
    model, variables, config = restore(args.workdir)
    # The run's own evaluation preprocessing (vit_jax.data's defaults where the config leaves it out).
    run = config.get("input_eval", {})
    norm = args.norm or run.get("normalization", None) or "minus_one_one"
    crop, crop_pct = args.crop or run.get("crop", None) or "resize", args.crop_pct or run.get("crop_pct", 0.875)
    if args.image_size or args.num_classes or args.model_option:
      raise SystemExit("--image-size/--num-classes/--model-option do not apply to --workdir checkpoints.")
  else:
    try:
      options = parse_key_values(args.model_option, "--model-option")
    except ValueError as e:
      raise SystemExit(str(e))
    model, variables = core.load_model(args.weights, model=args.model, num_classes=args.num_classes,
                                       image_size=args.image_size, posemb_resize=args.posemb_resize, **options)
    released = input_settings(args.model, to_2tuple(model.image_size))
    norm = args.norm or released.normalization
    crop_pct = args.crop_pct or released.crop_pct
    crop = args.crop or ("resize" if crop_pct >= 1.0 else "resize_small_central_crop")
  images = load_images(args.images, to_2tuple(model.image_size), crop, crop_pct, norm)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  num_classes = logits.shape[-1]
  names = labels.read_label_file(args.labels) if args.labels else labels.class_names(num_classes)
  if names is not None and len(names) != num_classes:
    raise SystemExit(f"the label file has {len(names)} names but the head has {num_classes} classes.")
  indices, probs = top_k(logits, min(args.top_k, num_classes))
  for path, row, prob in zip(args.images, indices, probs):
    print(path)
    for i, p in zip(row, prob):
      print(f"  {p:8.4f}  {i:>5d}  {names[i] if names else f'class {i}'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
