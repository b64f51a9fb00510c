"""Export a model for serving (TensorFlow SavedModel, StableHLO) or for other frameworks (timm, transformers).

    python -m vit_jax.export --workdir DIR --format savedmodel --out /tmp/vit_sm --preprocessing
    python -m vit_jax.export --weights timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --format stablehlo --out b16.shlo
    python -m vit_jax.export --model ViT-B_16 --weights ViT-B_16.npz --num-classes 10 --format timm --out b16.safetensors
    python -m vit_jax.export --workdir DIR --format transformers --out hf_dir

The model and weights come from a training run (`--workdir`, its latest checkpoint or `--step`) or
from anything `vit_jax.load_pretrained` reads (`--weights`: a catalogue name, which also names the
model, a URI or a file; `--model` and its options otherwise).

  savedmodel    jax2tf (native serialisation for `--platforms`), batch dimension polymorphic.
                Signature `serving_default`: float32 images [b, H, W, 3], already normalised ->
                {"logits"}.  With --preprocessing also `serving_uint8`: uint8 images [b, h, w, 3] of
                any size, resized (+ central crop) and normalised as the weights are evaluated (the
                settings of `python -m vit_jax.predict`) -> {"logits"}.
  stablehlo     `jax.export` artifact with a symbolic batch `b` (weights embedded as constants, or
                with --weights-as-arguments in PATH.weights.safetensors); PATH.json records the input
                shape and preprocessing.  `jax.export.deserialize(open(PATH, "rb").read()).call(images)`.
  timm          a timm state_dict (.safetensors)
  transformers  a Hugging Face directory (model.safetensors + config.json; ViT only)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

FORMATS = ("savedmodel", "stablehlo", "timm", "transformers")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The evaluation transform of `vit_jax.data` / `vit_jax.predict`: bilinear resize (crop_pct >= 1) or
  shorter side to size / crop_pct (bicubic) and a central crop, then (x / 255 - mean) / std."""
  image_size: tuple[int, int]
  crop_pct: float = 1.0
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  @property
  def crop(self) -> str:
    return "resize" if self.crop_pct >= 1.0 else "resize_small_central_crop"

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), crop=self.crop)


_NORMALIZATION = {"minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "none": ((0.0,) * 3, (1 / 255.0,) * 3)}


def preprocessing_from(settings, image_size) -> Preprocessing:
  """From a catalogue entry / `predict.input_settings` (crop_pct, mean, std) at the model's image size."""
  from vit_jax.models.layers import to_2tuple
  return Preprocessing(to_2tuple(image_size), float(settings.crop_pct), tuple(settings.mean), tuple(settings.std))


def preprocessing_from_run(config, image_size) -> Preprocessing:
  """The evaluation preprocessing of a training run (its `input_eval`, vit_jax.data's defaults otherwise)."""
  from vit_jax.models.layers import to_2tuple
  run = config.get("input_eval", {})
  mean, std = _NORMALIZATION[run.get("normalization", None) or "minus_one_one"]
  crop_pct = 1.0 if (run.get("crop", None) or "resize") == "resize" else float(run.get("crop_pct", 0.875))
  return Preprocessing(to_2tuple(image_size), crop_pct, mean, std)


def tf_preprocess(images, preprocessing: Preprocessing):
  """uint8 (or float 0..255) images [b, h, w, 3] of any size -> the model's normalised float32 input."""
  import tensorflow as tf
  from vit_jax.data import preprocess
  h, w = preprocessing.image_size
  if preprocessing.crop == "resize":
    one = lambda image: preprocess.resize(image, (h, w))  # noqa: E731
  else:
    one = lambda image: preprocess.resize_small_central_crop(image, (h, w), preprocessing.crop_pct)  # noqa: E731
  images = tf.cast(images, tf.float32)
  resized = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec((h, w, 3), tf.float32))
  return (resized / 255.0 - tf.constant(preprocessing.mean, tf.float32)) / tf.constant(preprocessing.std, tf.float32)


def _apply_fn(model):
  def apply(variables, images):
    return model.apply(variables, images, train=False)
  return apply


def _input_shape(model) -> tuple[int, int]:
  from vit_jax.models.layers import to_2tuple
  return to_2tuple(model.image_size)


def export_savedmodel(model, variables, path: str, *, preprocessing: Preprocessing | None = None,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
  """A TensorFlow SavedModel of `model` with `variables` (see the module docstring for its signatures)."""
  import flax.linen as nn
  import jax
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise ImportError(f"the savedmodel export needs TensorFlow and jax.experimental.jax2tf ({e}); install "
                      "tensorflow, or export --format stablehlo.") from e

  h, w = _input_shape(model)
  variables = jax.device_get(nn.meta.unbox(dict(variables)))
  options = {}
  if "native_serialization_platforms" in inspect.signature(jax2tf.convert).parameters:
    options["native_serialization_platforms"] = tuple(platforms)
  converted = jax2tf.convert(_apply_fn(model), polymorphic_shapes=[None, f"(b, {h}, {w}, 3)"], with_gradient=False,
                             **options)
  module = tf.Module()
  module.weights_tree = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False), variables)

  @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="images")], autograph=False)
  def serve(images):
    return {"logits": converted(module.weights_tree, images)}

  module.serve = serve
  signatures = {"serving_default": serve}
  if preprocessing is not None:
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")], autograph=False)
    def serve_uint8(images):
      return {"logits": converted(module.weights_tree, tf_preprocess(images, preprocessing))}
    module.serve_uint8 = serve_uint8
    signatures["serving_uint8"] = serve_uint8
  tf.saved_model.save(module, path, signatures=signatures)
  _write_json(os.path.join(path, "assets.extra", "vit_jax.json"), model, preprocessing, platforms)


def export_stablehlo(model, variables, path: str | None = None, *, weights_as_arguments: bool = False,
                     preprocessing: Preprocessing | None = None, platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """A `jax.export.Exported` of `model` with a symbolic batch size `b`; written to `path` (serialised, plus
  PATH.json, and PATH.weights.safetensors with `weights_as_arguments`) when given.

  Embedded weights: `exported.call(images)`; as arguments: `exported.call(variables, images)` with the
  variables of PATH.weights.safetensors (`vit_jax.weights.core.unflatten(safetensors.numpy.load_file(...))`).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export

  h, w = _input_shape(model)
  variables = jax.device_get(nn.meta.unbox(dict(variables)))
  (batch,) = jax_export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  apply = _apply_fn(model)
  if weights_as_arguments:
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), variables)
    exported = jax_export.export(jax.jit(apply), platforms=tuple(platforms))(specs, images)
  else:
    exported = jax_export.export(jax.jit(lambda x: apply(variables, x)), platforms=tuple(platforms))(images)
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
      f.write(exported.serialize())
    if weights_as_arguments:
      from safetensors.numpy import save_file
      from vit_jax.weights import core
      save_file({k: np.ascontiguousarray(v) for k, v in core.flatten(variables).items()}, path + ".weights.safetensors")
    _write_json(path + ".json", model, preprocessing, platforms, weights_as_arguments=weights_as_arguments)
  return exported


def _write_json(path, model, preprocessing, platforms, **extra) -> None:
  h, w = _input_shape(model)
  info = {"model": type(model).__name__, "input": {"shape": ["b", h, w, 3], "dtype": "float32"},
          "num_classes": int(model.num_classes), "platforms": list(platforms),
          "preprocessing": preprocessing.to_json() if preprocessing else None, **extra}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(info, f, indent=1)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.export", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="training workdir: export its latest checkpoint")
  p.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the latest")
  p.add_argument("--model", help="registered model name (vit_jax.list_models()); optional for catalogue weights")
  p.add_argument("--weights", help="catalogue name (vit_jax.list_pretrained()), gs:// / https:// / hf-hub: URI or file")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--out", required=True, help="output file (stablehlo, timm) or directory (savedmodel, transformers)")
  p.add_argument("--image-size", type=int, help="input resolution (default: the weights')")
  p.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's)")
  p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override, e.g. approximate_gelu=False (repeatable)")
  p.add_argument("--preprocessing", action="store_true",
                 help="savedmodel: add the `serving_uint8` signature (resize, crop, normalisation on uint8 images)")
  p.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                 help="savedmodel/stablehlo: platforms to lower for (comma-separated)")
  p.add_argument("--weights-as-arguments", action="store_true",
                 help="stablehlo: weights as the first argument (PATH.weights.safetensors), not constants")
  args = p.parse_args(argv)
  if (args.workdir is None) == (args.weights is None):
    p.error("give --workdir, or --weights (with --model unless the weights are a catalogue name).")
  if args.workdir and (args.model or args.image_size or args.num_classes or args.model_option):
    p.error("--workdir restores its own model; leave out --model/--image-size/--num-classes/--model-option.")
  return args


def load(args):
  """(model, variables, preprocessing) for the command line's source."""
  from vit_jax import predict
  from vit_jax.cli import parse_key_values
  from vit_jax.models.layers import to_2tuple
  from vit_jax.weights import catalog, core, hub

  if args.workdir:
    model, variables, config = predict.restore(args.workdir, step=args.step)
    return model, variables, preprocessing_from_run(config, model.image_size)
  try:
    options = parse_key_values(args.model_option, "--model-option")
  except ValueError as e:
    raise SystemExit(str(e))
  try:
    model, variables = core.load_model(args.weights, model=args.model, num_classes=args.num_classes,
                                       image_size=args.image_size, **options)
  except (TypeError, FileNotFoundError, hub.DownloadError, core.CheckpointMismatchError) as e:
    raise SystemExit(str(e))
  entry = catalog.lookup(args.weights) or (catalog.for_url(hub.split_subtree(args.weights)[0])
                                           if hub.is_uri(args.weights) else None)
  settings = entry or predict.input_settings(args.model or type(model).__name__, to_2tuple(model.image_size))
  return model, variables, preprocessing_from(settings, model.image_size)


def main(argv=None) -> int:
  args = parse_args(argv)
  from vit_jax.weights import core
  model, variables, preprocessing = load(args)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  try:
    if args.format == "savedmodel":
      export_savedmodel(model, variables, args.out, preprocessing=preprocessing if args.preprocessing else None,
                        platforms=platforms)
    elif args.format == "stablehlo":
      export_stablehlo(model, variables, args.out, weights_as_arguments=args.weights_as_arguments,
                       preprocessing=preprocessing, platforms=platforms)
    elif args.format == "timm":
      core.export_timm(variables, model=model, path=args.out)
    else:
      core.export_transformers(variables, model=model, path=args.out)
  except (ValueError, NotImplementedError) as e:
    raise SystemExit(f"cannot export to {args.format}: {e}")
  print(f"wrote {args.out} ({args.format}, {type(model).__name__}, image size {model.image_size}, "
        f"{model.num_classes} classes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
