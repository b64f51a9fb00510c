"""Top-k classes of images with a ViT-family model.

    python -m vit_jax.predict --model ViT-B_16 --weights ViT-B_16.npz cat.jpg dog.png
    python -m vit_jax.predict --model ViT-B_16 --weights model.safetensors --norm imagenet --image-size 384 x.jpg
    python -m vit_jax.predict --weights timm/vit_base_patch16_224.augreg2_in21k_ft_in1k x.jpg   # a catalogue name
    python -m vit_jax.predict --workdir /tmp/run x.jpg          # a checkpoint of `python -m vit_jax.main`

Weights are anything `vit_jax.load_pretrained` reads (official .npz, timm
state_dicts, ..., a catalogue name of `vit_jax.list_pretrained()` or a gs:// /
https:// / hf-hub: URI, downloaded once into the cache; a catalogue name also
names the model, so --model may be left out).  The head keeps the checkpoint's class count unless
--num-classes says otherwise; heads of 1000 / 21843 classes print ImageNet
names.  Images go through the evaluation preprocessing of the input pipeline
with the input settings of the released weights (the catalogue entry of the
weights, else the model's first entry at its image size: normalisation and centre crop,
e.g. [-1, 1] and a plain resize for the official ViT weights, ImageNet mean/std
and crop 0.875 for CrossViT) unless --norm / --crop / --crop-pct say otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import numpy as np

NORMS = ("minus_one_one", "imagenet", "none")
CROPS = ("resize", "resize_small_central_crop")


def restore(workdir: str, step: int | None = None, *, ema: bool = False):
  """`(model, variables, config)` of a training run's checkpoint, on this machine's devices.

      model, variables, config = vit_jax.restore(workdir)
      logits = model.apply(variables, images, train=False)

  `ema=True`: the EMA of the parameters (and BatchNorm statistics) instead of the raw ones (a run with
  config.ema_decay > 0).

  Only params (and BatchNorm statistics) are read, onto this process's first
  device, whatever mesh or device count the training run used, and checked
  against the checksums saved with them.  In a multi-process program every
  process must call it (Orbax synchronises the processes).
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
    try:  # a broken or hostile checkpoint: one error naming it and what is wrong
      checkpoint.check_complete(directory, step)
      config = ml_collections.ConfigDict(
          manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint.unreadable(step, directory, e) from e
    model = config_base.build_model(config)
    variables = nn.meta.unbox(registry.abstract_variables(model))
    wanted = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    if ema:
      if not config.get("ema_decay"):
        raise ValueError(f"the run in {workdir!r} kept no EMA of its parameters (config.ema_decay is 0); "
                         "restore it without ema=True (predict: without --ema).")
      wanted = {"ema": {"params": wanted["params"], "batch_stats": wanted.get("batch_stats", {})}}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True),
          data=ocp.args.JsonRestore()))
      saved = restored.data or {}
      if saved.get("checksum_kind") == checkpoint.CHECKSUM_KIND:  # damaged files: an error, never wrong weights
        checkpoint.verify_checksums(restored.state, saved.get("checksums"), f"checkpoint {step}")
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint.unreadable(step, directory, e) from e
  finally:
    manager.close()
  state = dict(restored.state)
  if ema:
    state = {k: v for k, v in state["ema"].items() if k == "params" or jax.tree.leaves(v)}
  return model, state, config


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.predict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
  add_model_arguments(p)
  p.add_argument("--labels", help="class-name file, one per line (overrides the ImageNet names)")
  p.add_argument("--top-k", type=int, default=5)
  args = p.parse_args(argv)
  check_model_arguments(p, args)
  return args


def add_model_arguments(p: argparse.ArgumentParser, random_init: bool = False) -> None:
  """The options that choose a model, its weights and its input preprocessing (predict, analyze, fewshot).

  `random_init`: --weights may be left out (a randomly initialised --model, or with --workdir
  --random-init the run's model at random: the baseline a trained representation is compared with).
  """
  p.add_argument("--model", help="registered model name (see vit_jax.list_models())")
  p.add_argument("--weights", help="checkpoint: a catalogue name (vit_jax.list_pretrained()), a gs:// / https:// / "
                                   "hf-hub: URI, or a .npz, .safetensors, .pth/.bin, TF checkpoint"
                                   + ("; left out: random initialisation (--seed)" if random_init else ""))
  p.add_argument("--workdir", help="training workdir to restore (instead of --model/--weights)")
  p.add_argument("--ema", action="store_true", help="with --workdir: the EMA weights of the run (config.ema_decay)")
  p.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
  p.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's)")
  p.add_argument("--norm", choices=NORMS, help="pixel normalisation (default: the released weights')")
  p.add_argument("--crop", choices=CROPS, help="resize (official ViT) or timm-style central crop "
                                               "(default: the released weights')")
  p.add_argument("--crop-pct", type=float, help="for --crop resize_small_central_crop (default: the weights')")
  p.add_argument("--posemb-resize", choices=("bilinear", "bicubic"), help="default: the family's")
  p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override, e.g. approximate_gelu=False (repeatable)")
  if random_init:
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: the latest)")
    p.add_argument("--random-init", action="store_true",
                   help="with --workdir: the run's model, randomly initialised (a baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random initialisation")


def check_model_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, random_init: bool = False) -> None:
  if args.workdir is None and not (args.weights or (random_init and args.model)):
    p.error("give --weights (and --model unless the weights are a catalogue name), or --workdir"
            + (", or --model alone for a random initialisation." if random_init else "."))
  if args.workdir is not None and (args.model or args.weights):
    p.error("--workdir restores its own model and weights; leave out --model/--weights.")
  if getattr(args, "ema", False) and args.workdir is None:
    p.error("--ema goes with --workdir (the EMA weights a training run kept).")
  if getattr(args, "random_init", False) and args.workdir is None:
    p.error("--random-init goes with --workdir (for --model, leave out --weights instead).")


@dataclasses.dataclass
class OpenedModel:
  """A model with its variables and the input preprocessing its weights expect."""
  model: Any
  variables: dict
  normalization: str
  crop: str
  crop_pct: float
  config: Any = None  # the training config of a --workdir run


def open_model(args: argparse.Namespace) -> OpenedModel:
  """The model of `add_model_arguments`' options: restored, loaded or (without weights) random.

  Preprocessing: --norm/--crop/--crop-pct, else a run's own evaluation settings, else the
  released weights' (the catalogue entry, else the model's first entry at its image size).
  """
  import flax.linen as nn
  import jax
  from vit_jax.cli import parse_key_values
  from vit_jax.models import registry
  from vit_jax.models.layers import to_2tuple
  from vit_jax.weights import core

  seed = getattr(args, "seed", 0)
  if args.workdir:
    if args.image_size or args.num_classes or args.model_option:
      raise SystemExit("--image-size/--num-classes/--model-option do not apply to --workdir checkpoints.")
    model, variables, config = restore(args.workdir, getattr(args, "step", None), ema=getattr(args, "ema", False))
    if getattr(args, "random_init", False):
      variables = jax.device_get(nn.meta.unbox(registry.init_variables(model, jax.random.key(seed))))
    # The run's own evaluation preprocessing (vit_jax.data's defaults where the config leaves it out).
    run = config.get("input_eval", {})
    norm = args.norm or run.get("normalization", None) or "minus_one_one"
    crop, crop_pct = args.crop or run.get("crop", None) or "resize", args.crop_pct or run.get("crop_pct", 0.875)
    return OpenedModel(model, variables, norm, crop, crop_pct, config)
  try:
    options = parse_key_values(args.model_option, "--model-option")
  except ValueError as e:
    raise SystemExit(str(e))
  from vit_jax.weights import catalog, hub
  try:
    if args.weights:
      model, variables = core.load_model(args.weights, model=args.model, num_classes=args.num_classes,
                                         image_size=args.image_size, posemb_resize=args.posemb_resize, **options)
    else:
      try:
        model = registry.get_model(args.model, num_classes=args.num_classes or 1000, image_size=args.image_size,
                                   **options)
      except ValueError as e:  # an unknown name or option value: the message lists the valid ones
        raise SystemExit(str(e))
      variables = jax.device_get(nn.meta.unbox(registry.init_variables(model, jax.random.key(seed))))
  except (TypeError, FileNotFoundError, hub.DownloadError) as e:
    raise SystemExit(str(e))
  entry = args.weights and (catalog.lookup(args.weights) or (
      catalog.for_url(hub.split_subtree(args.weights)[0]) if hub.is_uri(args.weights) else None))
  released = entry if entry and (args.model in (None, entry.model)) else \
      input_settings(args.model, to_2tuple(model.image_size))
  crop_pct = args.crop_pct or released.crop_pct
  crop = args.crop or ("resize" if crop_pct >= 1.0 else "resize_small_central_crop")
  return OpenedModel(model, variables, args.norm or released.normalization, crop, crop_pct)


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
  """The catalogue entry of the model's released weights at `image_size` (else its first one)."""
  from vit_jax.models import registry
  cfgs = registry.pretrained_cfgs(model_name)
  if not cfgs:
    from vit_jax.weights import catalog
    return catalog.Pretrained("none", model_name, (), image_size[0], crop_pct=1.0)
  return next((c for c in cfgs if (c.image_size, c.image_size) == tuple(image_size)), cfgs[0])


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  from vit_jax import labels
  from vit_jax.models.layers import to_2tuple

  opened = open_model(args)
  model, variables = opened.model, opened.variables
  norm, crop, crop_pct = opened.normalization, opened.crop, opened.crop_pct
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
