"""Top-k classes of images with a ViT-family model.

    python -m vit_jax.predict --model ViT-B_16 --weights ViT-B_16.npz cat.jpg dog.png
    python -m vit_jax.predict --model vit_base --weights model.safetensors --norm imagenet --image-size 384 x.jpg
    python -m vit_jax.predict --workdir /tmp/run x.jpg          # a checkpoint of `python -m vit_jax.main`

Weights are anything `vit_jax.load_pretrained` reads (official .npz, timm
state_dicts, ...).  The head keeps the checkpoint's class count unless
--num-classes says otherwise; heads of 1000 / 21843 classes print ImageNet
names.  Images go through the evaluation preprocessing of the input pipeline
(bilinear resize to the model's size by default, as the official ViT code) and
are normalised to [-1, 1] (official ViT weights) unless --norm says otherwise.
"""
from __future__ import annotations

import argparse
import ast
import sys

import numpy as np

NORMS = ("minus_one_one", "imagenet", "none")
CROPS = ("resize", "resize_small_central_crop")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.predict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
  p.add_argument("--model", help="registered model name (see vit_jax.list_models())")
  p.add_argument("--weights", help="checkpoint: .npz, .safetensors, .pth/.bin, TF checkpoint")
  p.add_argument("--workdir", help="training workdir to restore (instead of --model/--weights)")
  p.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
  p.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's)")
  p.add_argument("--norm", choices=NORMS, help="pixel normalisation (default minus_one_one, the official ViT's)")
  p.add_argument("--crop", choices=CROPS, default="resize", help="resize (official) or timm-style central crop")
  p.add_argument("--crop-pct", type=float, default=0.875, help="for --crop resize_small_central_crop")
  p.add_argument("--posemb-resize", default="bilinear", choices=("bilinear", "bicubic"))
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


def model_options(pairs: list[str]) -> dict:
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise SystemExit(f"--model-option expects KEY=VALUE, got {pair!r}.")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value  # a plain string, e.g. classifier=gap
  return options


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


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import vit_jax
  from vit_jax import labels
  from vit_jax.weights import core
  from vit_jax.models.layers import to_2tuple

  norm = args.norm or "minus_one_one"
  if args.workdir:
    model, variables, config = vit_jax.restore(args.workdir)
    # The run's own evaluation normalisation (vit_jax.data's default when the config leaves it out).
    norm = args.norm or config.get("input_eval", {}).get("normalization", None) or norm
    if args.image_size or args.num_classes or args.model_option:
      raise SystemExit("--image-size/--num-classes/--model-option do not apply to --workdir checkpoints.")
  else:
    flat = core.read_source(args.weights)
    num_classes = args.num_classes or core.checkpoint_num_classes(flat, args.model) or 1000
    model = vit_jax.get_model(args.model, num_classes=num_classes, image_size=args.image_size,
                              **model_options(args.model_option))
    variables = vit_jax.load_pretrained(flat, model=model, posemb_resize=args.posemb_resize)
  images = load_images(args.images, to_2tuple(model.image_size), args.crop, args.crop_pct, norm)
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
