"""`python -m vit_jax.export`: TensorFlow SavedModel and StableHLO artifacts loaded back and called, timm and
transformers files written from a training run's checkpoint.  Tolerance: 1e-5 on float32 logits."""
import json
import pathlib

import jax
import numpy as np
import pytest

import vit_jax
from vit_jax import export
from vit_jax.weights import core

FIX = pathlib.Path(__file__).parent / "fixtures" / "vit"
OPTS = json.loads((FIX / "cases.json").read_text())["plain_token"]
TOL = 1e-5


def ours(model, variables, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply(variables, images, train=False))


@pytest.fixture(scope="module")
def tiny():
  model = vit_jax.get_model("ViT-B_16", **OPTS)
  return model, vit_jax.load_pretrained(FIX / "plain_token.official.npz", model=model)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, load_config, with_random_head):
  """A training run's checkpoint (configs/testing.py: a tiny ViT at 8 px, 10 classes) with a random head."""
  from vit_jax.train import checkpoint as ckpt_lib, optim, sharding as shd, state as state_lib, trainer
  config = load_config()
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state = state_lib.create_train_state(model, tx, mesh, 0)
  state = state.replace(params=with_random_head({"params": jax.device_get(state.params)}, 3)["params"])
  path = tmp_path_factory.mktemp("run")
  saver = ckpt_lib.Checkpointer(str(path))
  saver.save(7, state, {}, config)
  saver.close()
  return str(path), model, {"params": jax.device_get(state.params)}


def test_savedmodel_from_a_workdir_matches_our_logits(workdir, tmp_path):
  tf = pytest.importorskip("tensorflow")
  pytest.importorskip("jax.experimental.jax2tf")
  path, model, variables = workdir
  out = str(tmp_path / "savedmodel")
  assert export.main(["--workdir", path, "--format", "savedmodel", "--out", out, "--preprocessing"]) == 0
  loaded = tf.saved_model.load(out)
  rng = np.random.default_rng(0)
  for batch in (1, 3):  # one artifact, any batch size
    images = rng.normal(size=(batch, 8, 8, 3)).astype(np.float32)
    got = loaded.signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
    assert got.shape == (batch, 10) and np.abs(got - ours(model, variables, images)).max() < TOL
  # uint8 images of another size: the run's eval preprocessing (resize to 8x8, [-1, 1]) inside the graph.
  pixels = rng.integers(0, 256, (2, 20, 12, 3), dtype=np.uint8)
  got = loaded.signatures["serving_uint8"](images=tf.constant(pixels))["logits"].numpy()
  want = ours(model, variables, tf.image.resize(pixels.astype(np.float32), (8, 8)).numpy() / 127.5 - 1.0)
  assert np.abs(got - want).max() < TOL
  info = json.loads((tmp_path / "savedmodel" / "assets.extra" / "vit_jax.json").read_text())
  assert info["preprocessing"]["crop"] == "resize" and info["input"]["shape"] == ["b", 8, 8, 3]


def test_savedmodel_preprocessing_of_released_weights(tiny, tmp_path):
  # ImageNet mean/std and a 0.875 central crop (the CrossViT/timm setting) on a model of the fixture.
  tf = pytest.importorskip("tensorflow")
  pytest.importorskip("jax.experimental.jax2tf")
  model, variables = tiny
  settings = export.Preprocessing((32, 32), 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  export.export_savedmodel(model, variables, str(tmp_path / "sm"), preprocessing=settings, platforms=("cpu",))
  loaded = tf.saved_model.load(str(tmp_path / "sm"))
  pixels = np.random.default_rng(1).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
  got = loaded.signatures["serving_uint8"](images=tf.constant(pixels))["logits"].numpy()
  from vit_jax.data import preprocess
  want = np.stack([preprocess.normalize(preprocess.resize_small_central_crop(tf.constant(p), (32, 32), 0.875),
                                        "imagenet").numpy() for p in pixels])  # vit_jax.predict's transform
  assert np.abs(got - ours(model, variables, want)).max() < TOL


def test_stablehlo_deserialises_and_runs_at_any_batch(tiny, tmp_path):
  from jax import export as jax_export
  model, variables = tiny
  path = str(tmp_path / "vit.stablehlo")
  export.export_stablehlo(model, variables, path, preprocessing=export.Preprocessing((32, 32)))
  exported = jax_export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  assert str(exported.in_avals[0].shape[0]) == "b" and exported.platforms == ("cpu", "cuda", "tpu")
  for batch in (1, 4):
    images = np.random.default_rng(batch).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    assert np.abs(np.asarray(exported.call(images)) - ours(model, variables, images)).max() < TOL
  assert json.loads(pathlib.Path(path + ".json").read_text())["num_classes"] == 5


def test_stablehlo_with_weights_as_arguments_from_a_workdir(workdir, tmp_path):
  from jax import export as jax_export
  from safetensors.numpy import load_file
  path, model, variables = workdir
  out = str(tmp_path / "run.stablehlo")
  assert export.main(["--workdir", path, "--format", "stablehlo", "--out", out, "--weights-as-arguments",
                      "--platforms", "cpu"]) == 0
  exported = jax_export.deserialize(bytearray(pathlib.Path(out).read_bytes()))
  weights = core.unflatten(load_file(out + ".weights.safetensors"))
  images = np.random.default_rng(2).normal(size=(5, 8, 8, 3)).astype(np.float32)
  assert np.abs(np.asarray(exported.call(weights, images)) - ours(model, variables, images)).max() < TOL


@pytest.mark.parametrize("fmt", ["timm", "transformers"])
def test_timm_and_transformers_files_from_a_workdir(workdir, tmp_path, fmt):
  path, model, variables = workdir
  out = tmp_path / ("vit.safetensors" if fmt == "timm" else "hf")
  assert export.main(["--workdir", path, "--format", fmt, "--out", str(out)]) == 0
  written = core.read_source(out if fmt == "timm" else out / "model.safetensors")
  direct = (vit_jax.export_timm if fmt == "timm" else vit_jax.export_transformers)(variables, model=model)
  assert written.keys() == direct.keys() and all(np.array_equal(written[k], direct[k]) for k in written)
  back = vit_jax.load_pretrained(out if fmt == "timm" else out / "model.safetensors", model=model)
  images = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32)
  assert np.abs(ours(model, back, images) - ours(model, variables, images)).max() < TOL


def test_bad_invocations(tmp_path):
  with pytest.raises(SystemExit):
    export.parse_args(["--format", "timm", "--out", "x"])  # neither --workdir nor --weights
  with pytest.raises(SystemExit, match="pass model="):
    export.main(["--weights", str(FIX / "plain_token.official.npz"), "--format", "timm", "--out", "x"])
  bv = pathlib.Path(__file__).parent / "fixtures" / "big_vision"
  options = json.loads((bv / "cases.json").read_text())["sincos_gap"]
  with pytest.raises(SystemExit, match="cannot export to transformers: .*classifier='gap'"):
    export.main(["--model", "ViT-B_16", "--weights", str(bv / "sincos_gap.npz"), "--format", "transformers",
                 "--out", str(tmp_path / "x"), "--image-size", "32", "--num-classes", "5"]
                + [f"--model-option={k}={v}" for k, v in options.items() if k not in ("image_size", "num_classes")])
