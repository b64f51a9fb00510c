"""Fine-tuning on one device: fresh-install data preparation, accum_steps="auto", BatchNorm under accumulation,
EMA, layer-wise lr decay, frozen parameters, patch-size change on load (PI-resize), and the whole CIFAR-10 path
on CPU (TFDS mock data, a tiny model)."""
import json
import re
import socket

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import vit_jax
from vit_jax.models import registry
from vit_jax.train import checkpoint as ckpt_lib
from vit_jax.train import config_base, memory, optim, sharding as shd, state as state_lib, step as step_lib, trainer
from vit_jax.weights import fit

TINY_VIT = dict(patch_size=2, hidden_size=32, depth=2, mlp_dim=64, num_heads=2)


def tiny_vit(**overrides):
  return registry.get_model("ViT-Ti_16", **{"num_classes": 10, "image_size": 8, **TINY_VIT, **overrides})


def losses(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}


def random_tree(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree)


# ----------------------------------------------------------------------------- 0. a fresh install

def test_preparing_a_tfds_data_set_reaches_the_download_step(tmp_path, monkeypatch):
  """cifar10 not on disk: building and preparing it gets as far as the HTTP request (which needs
  importlib_resources on the way); offline, the error says so and how to prepare it elsewhere."""
  import requests
  from vit_jax.data import sources
  requested = []

  def offline(self, request, **kwargs):  # the transport, below TFDS's downloader: no network here
    requested.append(request.url)
    raise requests.exceptions.ConnectionError("Failed to resolve host") from socket.gaierror(-2, "Name unknown")
  monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", offline)

  with pytest.raises(sources.DatasetDownloadError) as info:
    sources.TfdsSource("cifar10", str(tmp_path))
  assert requested and requested[0].startswith("https://www.cs.toronto.edu/~kriz/cifar-10")
  message = str(info.value)
  assert "no network" in message and "gaierror" in message
  assert "tfds build cifar10 --data_dir=DIR" in message and "--config.data_dir=DIR" in message
  # Through the trainer: one ValueError naming the data set (main prints it as one line).
  config = config_base.base_config()
  config.dataset, config.data_dir = "cifar10", str(tmp_path)
  with pytest.raises(ValueError, match="data set 'cifar10' cannot be opened: Could not download"):
    trainer.open_dataset(config)


def test_finetune_recipe_arguments_and_a_missing_checkpoint(load_config):
  assert load_config("vit_finetune", "cifar100").dataset == "cifar100"  # a bare preset is the data set
  assert load_config("vit_finetune", "cifar10,image_size=224").image_size == 224
  with pytest.raises(ValueError, match="did you mean dataset=cifar10"):
    load_config("vit_finetune", "cifar_10")
  config = load_config("vit_finetune", "model=ViT-B_16,dataset=cifar10")
  with pytest.raises(ValueError, match="config.pretrained is not set.*--config.pretrained=scratch"):
    trainer.validate(config)  # before any data set is opened
  for scratch in ("scratch", ""):
    config.pretrained = scratch
    assert config_base.pretrained_source(config) is None
  config.pretrained = "vit_models/imagenet21k/ViT-B_16"
  assert config_base.pretrained_source(config) == "vit_models/imagenet21k/ViT-B_16"


# ----------------------------------------------------------------------------- 1. it fits by itself

def test_accum_auto_fits_a_budget_and_trains_as_the_explicit_setting(tmp_path, load_config, capsys, monkeypatch):
  """A budget between the footprints of 1 and 2 micro-batches: "auto" compiles the real step, picks 2, and
  the run logs exactly the losses of accum_steps=2."""
  config = load_config()
  config.mesh.data, config.total_steps, config.warmup_steps, config.eval_every, config.checkpoint_every = 2, 2, 1, 0, 0
  setup = trainer.validate(config)
  one, two = (memory.train_footprint(config, setup, k) for k in (1, 2))
  assert one.total > two.total, (one, two)
  with pytest.raises(ValueError, match="memory_budget_gb"):  # a CPU reports no memory limit
    config.accum_steps = "auto"
    trainer.validate(config)
  config.memory_budget_gb = (one.total + two.total) / 2 / memory.GIB
  trainer.train_and_evaluate(config, str(tmp_path / "auto"))
  out = capsys.readouterr().out
  assert re.search(r"accum_steps=auto: 2 micro-batch\(es\) of 8 \(global batch 16\)", out), out
  explicit = load_config()
  explicit.mesh.data, explicit.total_steps, explicit.warmup_steps, explicit.eval_every = 2, 2, 1, 0
  explicit.checkpoint_every = 0
  explicit.accum_steps = 2
  trainer.train_and_evaluate(explicit, str(tmp_path / "explicit"))
  assert losses(tmp_path / "auto") == losses(tmp_path / "explicit")
  # A budget below every micro-batch is named before training (measured footprints, no compilation here).
  import dataclasses
  monkeypatch.setattr(memory, "train_footprint", lambda config, setup, k, ema=None: dataclasses.replace(
      two, accum_steps=k, micro_batch=16 // k))
  config.memory_budget_gb = two.total / 2 / memory.GIB
  with pytest.raises(ValueError, match="even a micro-batch of 2 needs .* over the budget"):  # 16 = 2 x 8 steps
    memory.fit_setup(config, setup, log=lambda _: None)


def test_batchnorm_statistics_under_accumulation_are_the_mean_over_micro_batches():
  """MaxViT, accum_steps=2: each micro-batch is normalised with its own statistics and updates the running
  ones from the step's start; the new statistics are the mean of those updates (and the loss the mean)."""
  model = registry.get_model("MaxViT-T", num_classes=10, image_size=32, depths=(1, 1), embed_dims=(16, 16),
                             stem_width=8, head_dim=8, head_hidden_size=16, window_size=2, drop_path_rate=0.0)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx = optax.sgd(0.1)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_train_state(model, tx, mesh, 0, None, shardings)
  before = jax.device_get(state.batch_stats)
  params = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32), "label": np.array([1, 2, 3, 4], np.int32)}
  apply = jax.jit(lambda stats, x: model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                               mutable=["batch_stats"]))
  expected_stats, expected_losses = [], []
  for rows in ([0, 2], [1, 3]):  # micro-batch i = rows i, i + accum (step.py)
    logits, updates = apply(before, batch["image"][rows])
    expected_stats.append(updates["batch_stats"])
    expected_losses.append(step_lib.cross_entropy(logits, jax.nn.one_hot(batch["label"][rows], 10)))
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *expected_stats)
  train_step = step_lib.make_train_step(model, tx, optax.constant_schedule(0.1), mesh, shardings, accum_steps=2)
  state, metrics = train_step(state, batch)
  got = jax.device_get(state.batch_stats)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6), got, expected)
  np.testing.assert_allclose(float(metrics["train_loss"]), np.mean(expected_losses), rtol=1e-5)
  # ... which differs from chaining the micro-batches (the second starting from the first's update).
  chained = apply(expected_stats[0], batch["image"][[1, 3]])[1]["batch_stats"]
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), chained, got))) > 1e-4


# ----------------------------------------------------------------------------- 2. what the recipes use

def test_ema_decay_warmup_is_timm_model_ema_v3_and_the_state_follows_it(load_config):
  torch = pytest.importorskip("torch")
  import importlib.util
  timm_spec = importlib.util.find_spec("timm")
  if timm_spec is None:
    pytest.skip("timm is not installed (the test extras install it)")
  # timm/utils/model_ema.py needs only torch (the timm.utils package would import torchvision).
  spec = importlib.util.spec_from_file_location(
      "timm_model_ema", f"{timm_spec.submodule_search_locations[0]}/utils/model_ema.py")
  model_ema = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(model_ema)
  timm_ema = model_ema.ModelEmaV3(torch.nn.Linear(1, 1), decay=0.999, use_warmup=True, warmup_power=3 / 4)
  steps = [1, 2, 3, 10, 100, 10_000, 1_000_000]
  ours = [float(state_lib.ema_decay(t, 0.999, True, 1.0, 3 / 4)) for t in steps]
  np.testing.assert_allclose(ours, [timm_ema.get_decay(t) for t in steps], rtol=1e-6, atol=1e-7)
  assert float(state_lib.ema_decay(5, 0.9, warmup=False)) == pytest.approx(0.9)

  config = load_config()
  config.ema_decay, config.ema_warmup_power = 0.9, 3 / 4
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config, model=model)
  mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  _, shardings = state_lib.state_shardings(model, tx, mesh, ema=True)
  state = state_lib.create_train_state(model, tx, mesh, 0, None, shardings)
  train_step = step_lib.make_train_step(model, tx, lr, mesh, shardings, ema=config_base.ema_options(config))
  rng = np.random.default_rng(0)
  ema = jax.device_get(state.params)
  for t in range(1, 4):
    batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = train_step(state, batch)
    decay = float(state_lib.ema_decay(t, 0.9, True, 1.0, 3 / 4))
    assert float(metrics["ema_decay"]) == pytest.approx(decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, jax.device_get(state.params))
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7),
               jax.device_get(state.ema["params"]), ema)
  assert not np.allclose(jax.device_get(state.ema["params"])["head"]["kernel"],
                         jax.device_get(state.params)["head"]["kernel"])


def test_a_checkpoint_written_before_the_ema_field_still_restores(tmp_path, load_config):
  @flax.struct.dataclass
  class OldTrainState:  # TrainState as it was: no `ema`
    step: jax.Array
    params: dict
    opt_state: object
    batch_stats: dict
    rng: jax.Array

  config = load_config()
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_train_state(model, tx, mesh, 0, None, shardings)
  old = OldTrainState(state.step, state.params, state.opt_state, state.batch_stats, state.rng)
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(3, old, {}, config)
  saver.close()
  restored, _, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, config)
  assert step == 3 and restored.ema == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.params))


def _tiny_models():
  crossvit = registry.get_model("CrossViT-Ti", num_classes=3, image_size=36, large_image_size=32,
                                embed_dims=(8, 16), num_heads=(2, 4), mlp_ratios=(1.0, 1.0), num_multiscale_blocks=2,
                                large_depth=1)
  maxvit = registry.get_model("MaxViT-T", num_classes=3, image_size=64, depths=(1, 2), embed_dims=(8, 16),
                              stem_width=8, head_dim=8, head_hidden_size=16, window_size=4)
  return {"vit": tiny_vit(), "vit_scan": tiny_vit(scan=True), "crossvit": crossvit, "maxvit": maxvit}


def test_layer_decay_depth_order_of_every_family():
  """SGD without momentum: update / (-lr * grad) is each parameter's factor decay ** (num_layers - 1 - layer_id)."""
  decay = 0.5
  expected = {  # path prefix -> layer id (num_layers: ViT depth + 2 = 4, CrossViT K + 2 = 4, MaxViT stages + 2 = 4)
      "vit": {"embedding": 0, "cls": 0, "Transformer/posembed_input": 0, "Transformer/encoderblock_0": 1,
              "Transformer/encoderblock_1": 2, "Transformer/encoder_norm": 3, "head": 3},
      "crossvit": {"patch_embed_0": 0, "patch_embed_1": 0, "cls_token_1": 0, "pos_embed_0": 0,
                   "multiscale_block_0": 1, "multiscale_block_1": 2, "norm_0": 3, "head_1": 3},
      "maxvit": {"stem_conv1": 0, "stem_norm": 0, "block_0_0": 1, "block_1_0": 2, "block_1_1": 2, "head_norm": 3,
                 "pre_logits": 3, "head": 3},
  }
  for name, model in _tiny_models().items():
    config = config_base.base_config()
    config.optimizer, config.momentum, config.lr, config.warmup_steps, config.grad_clip_norm = "sgd", 0.0, 1.0, 0, 0.0
    config.decay_type, config.layer_decay = "constant", decay
    tx, _ = optim.make_optimizer(config, 10, 0, model=model)
    params = jax.device_get(flax.linen.meta.unbox(registry.abstract_variables(model)["params"]))
    params = random_tree(params)
    grads = random_tree(params, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    factors = jax.tree.map(lambda u, g: -u / g, updates, grads)
    seen = set()
    for path, factor in jax.tree_util.tree_leaves_with_path(factors):
      path = optim.param_path(path)
      if name == "vit_scan" and path.startswith("Transformer/encoderblock/"):  # one factor per stacked layer
        np.testing.assert_allclose(factor.reshape(factor.shape[0], -1)[:, 0], [decay ** 2, decay], rtol=1e-6)
        seen.add("scan")
        continue
      table = expected["vit" if name == "vit_scan" else name]
      prefix = next((p for p in table if path == p or path.startswith(p + "/")), None)
      if prefix is None:
        continue
      np.testing.assert_allclose(factor, decay ** (3 - table[prefix]), rtol=1e-6, err_msg=f"{name} {path}")
      seen.add(prefix)
    assert seen == ({"scan", "embedding", "cls", "Transformer/posembed_input", "Transformer/encoder_norm", "head"}
                    if name == "vit_scan" else set(expected[name])), (name, seen)


def test_frozen_parameters_have_no_optimizer_state_and_stay(load_config):
  config = load_config()
  config.model.depth, config.frozen = 2, "Transformer/encoderblock_0/.*"
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config, model=model)  # adamw: mu and nu per trained parameter
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  block0 = size(abstract.params["Transformer"]["encoderblock_0"])
  arrays = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim]  # (the rest: step counters)
  assert sum(int(np.prod(x.shape)) for x in arrays) == 2 * (size(abstract.params) - block0)  # adam's mu, nu
  assert jax.tree.leaves(optax.set_to_zero().init(abstract.params)) == []  # set_to_zero keeps nothing
  state = state_lib.create_train_state(model, tx, mesh, 0, None, shardings)
  before = jax.device_get(state.params)
  train_step = step_lib.make_train_step(model, tx, lr, mesh, shardings)
  rng = np.random.default_rng(0)
  for _ in range(3):
    state, _ = train_step(state, {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                                  "label": rng.integers(0, 10, 16).astype(np.int32)})
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, after["Transformer"]["encoderblock_0"],
               before["Transformer"]["encoderblock_0"])
  assert np.abs(after["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"]
                - before["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"]).max() > 1e-4
  config.frozen = "encoderblock_0/.*"  # fullmatch: matches nothing
  with pytest.raises(ValueError, match="matches no parameter.*Transformer/encoderblock"):
    optim.make_optimizer(config, model=model)


def test_patch_size_change_on_load_gives_the_same_tokens_for_upsampled_patches():
  """FlexiViT PI-resize: a /4 checkpoint loaded as /8; every 4x4 patch bilinearly resized to 8x8 gives the very
  tokens (and logits) of the original model.  The other way (/8 -> /4) is the least-squares approximation."""
  # Our resize matrix is tf.image.resize (bilinear, half-pixel centres), as big_vision's resample_patchemb.
  for old, new in (((4, 4), (8, 8)), ((8, 8), (4, 4)), ((3, 5), (7, 2))):
    basis = np.eye(old[0] * old[1]).reshape(-1, old[0], old[1], 1)
    tf_matrix = tf.image.resize(basis, new, method="bilinear").numpy().reshape(len(basis), -1).T
    np.testing.assert_allclose(fit.bilinear_resize_matrix(old, new), tf_matrix, atol=1e-6)

  small = tiny_vit(image_size=16, patch_size=4, num_classes=5)  # a 4x4 grid
  variables = random_tree(jax.device_get(flax.linen.meta.unbox(registry.abstract_variables(small))))
  report = []
  model, loaded = vit_jax.load_model(variables["params"], model="ViT-Ti_16", image_size=32, patch_size=8, report=report,
                                     **{k: v for k, v in TINY_VIT.items() if k != "patch_size"})
  assert model.patch_size == 8 and loaded["params"]["embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert report == ["embedding/kernel 4x4 -> 8x8 patches (pi-resize)"]
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4, 3)
  up = tf.image.resize(patches, (8, 8), method="bilinear").numpy()
  upsampled = up.reshape(2, 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 32, 32, 3)

  def tokens_and_logits(m, v, x):
    logits, state = m.apply(v, x, train=False, capture_intermediates=True)
    return np.asarray(state["intermediates"]["embedding"]["__call__"][0]), np.asarray(logits)
  want_tokens, want_logits = tokens_and_logits(small, variables, images)
  got_tokens, got_logits = tokens_and_logits(model, loaded, upsampled)
  np.testing.assert_allclose(got_tokens, want_tokens, atol=2e-4 * np.abs(want_tokens).max())
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-4 * np.abs(want_logits).max())
  # Without the resize the patch size is a mismatch, named.
  with pytest.raises(fit.CheckpointMismatchError, match="embedding/kernel"):
    vit_jax.load_pretrained(variables["params"], model="ViT-Ti_16", image_size=32, patch_size=8, patch_resize=None,
                            **{k: v for k, v in TINY_VIT.items() if k != "patch_size"})


# ----------------------------------------------------------------------------- 3. the guide, on CPU

class _RealFs:
  """Stands in for tfds.testing's MockFs, which swaps the file system of the whole process while `as_dataset`
  runs (to fake the data directory's existence): an evaluation pass starting while Orbax still writes a
  checkpoint in its background thread would send that write into the fake file system."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_file(self, path, content=""):
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(content)


def test_finetune_cifar10_end_to_end_on_cpu(tmp_path, load_config, capsys, monkeypatch):
  """configs/vit_finetune.py:cifar10 on TFDS mock data with a tiny model: a pretrained file of another class count
  and resolution (zero head, resized position embeddings), EMA and layer decay on, checkpoints written, a second
  start resumes (not re-initialised), vit_jax.restore(ema=) and predict --ema read the result."""
  from PIL import Image
  from vit_jax import predict
  from vit_jax.weights.core import flatten
  source = tiny_vit(image_size=8, num_classes=5)  # 4x4 grid, 5 classes
  variables = random_tree(jax.device_get(flax.linen.meta.unbox(registry.abstract_variables(source))))
  np.savez(tmp_path / "tiny_i21k.npz", **flatten(variables["params"]))

  config = load_config("vit_finetune", "cifar10,image_size=16")  # 8x8 grid, 10 classes
  config.model.update(TINY_VIT)
  config.model.name = "ViT-Ti_16"
  config.pretrained = str(tmp_path / "tiny_i21k.npz")
  config.batch_size, config.eval_batch_size, config.total_steps, config.warmup_steps = 8, 16, 4, 1
  config.checkpoint_every, config.eval_every, config.log_every, config.progress_secs = 2, 4, 1, 0.0
  config.ema_decay, config.layer_decay = 0.9, 0.75
  config.mesh.data = 2
  workdir = str(tmp_path / "run")
  from tensorflow_datasets.testing import test_utils
  monkeypatch.setattr(test_utils, "MockFs", _RealFs)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE,
                              data_dir=str(tmp_path / "tfds")):
    result = trainer.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Started a new run" in out and "tiny_i21k.npz" in out
    assert "new zero-initialised head of 10 classes (the checkpoint's has 5)" in out
    assert "pos_embedding 17 -> 65 tokens (8x8 grid, bilinear)" in out
    assert 0.0 <= result["eval_ema_accuracy"] <= 1.0 and "EMA weights: top-1" in out
    assert ckpt_lib.Checkpointer(workdir).steps() == [2, 4]
    # Started again with the same workdir: resumed, the pretrained file is not loaded again.
    again = trainer.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Resumed from the checkpoint at step 4" in out and "is not loaded: it only initialises a new run" in out
    assert again["eval_accuracy"] == result["eval_accuracy"]

  model, raw, saved = vit_jax.restore(workdir)
  _, ema, _ = vit_jax.restore(workdir, ema=True)
  assert saved.num_classes == 10 and set(ema) == {"params"}
  assert not np.allclose(raw["params"]["head"]["kernel"], ema["params"]["head"]["kernel"])
  pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "cat.png")
  assert predict.main(["--workdir", workdir, "--ema", "--top-k", "3", str(tmp_path / "cat.png")]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].endswith("cat.png") and len(printed) == 4
  image = predict.load_images([str(tmp_path / "cat.png")], (16, 16), "resize", 1.0, "minus_one_one")
  probs = np.asarray(jax.nn.softmax(model.apply(ema, image, train=False)[0]))
  assert [int(line.split()[1]) for line in printed[1:]] == np.argsort(-probs)[:3].tolist()
