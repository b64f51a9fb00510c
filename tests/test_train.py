"""Sharded training on 8 simulated CPU devices: meshes, accumulation, precision, schedules, bad input."""
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax.data import device
from vit_jax.train import config_base, optim, sharding as shd, state as state_lib, step as step_lib, trainer


def fixed_batches(n, batch=16, size=8, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, classes, batch).astype(np.int32)} for _ in range(n)]


def to_global(batch, mesh, keys=shd.TRAIN_KEYS):
  return device.to_global(batch, shd.batch_shardings(mesh, keys))


def run_steps(config, mesh_sizes, batches, variables=None):
  """Losses and final state of len(batches) steps on a mesh (data, fsdp, tensor)."""
  mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_sizes)))
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, variables)
  train_step = step_lib.make_train_step(model, tx, lr, mesh, shardings, accum_steps=config.accum_steps)
  losses = []
  for batch in batches:
    state, metrics = train_step(state, to_global(batch, mesh))
    losses.append(float(metrics["train_loss"]))
  return np.array(losses), state


MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def equivalence_config(load_config):
  config = load_config()
  # adamw with a larger eps: Adam divides by sqrt(v), which would blow float noise in near-zero
  # gradients up to visible differences between reduction orders.
  config.lr, config.warmup_steps, config.eps = 1e-2, 0, 1e-3
  return config


@pytest.fixture(scope="module")
def mesh_runs(load_config, initial_variables):
  """The same 5 steps (same init, same batches) on every mesh: {mesh: (losses, params, state)}."""
  config = equivalence_config(load_config)
  batches = fixed_batches(5)
  variables = initial_variables(config)
  results = {}
  with jax.default_matmul_precision("highest"):
    for sizes in MESHES:
      losses, state = run_steps(config, sizes, batches, variables)
      results[sizes] = (losses, jax.device_get(state.params), state)
  return variables, batches, results


def assert_params_close(params, expected, what):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=what), params, expected)


def test_meshes_give_the_same_training(mesh_runs):
  """(1,1,1), (8,1,1), (2,4,1), (2,2,2): equal losses and parameters after 5 steps (float32)."""
  variables, _, results = mesh_runs
  ref_losses, ref_params, _ = results[(1, 1, 1)]
  assert np.all(np.isfinite(ref_losses)) and len(set(ref_losses.tolist())) == 5  # every step changed the model
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref_params, variables["params"])
  assert moved["head"]["kernel"] > 1e-3
  assert moved["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"] > 1e-3
  for sizes, (losses, params, _) in results.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, atol=2e-6, err_msg=f"mesh {sizes}")
    assert_params_close(params, ref_params, f"mesh {sizes}")
  # The layouts really differ: FSDP shards `embed`, the tensor axis shards heads and MLP width, also in
  # the optimiser state (adamw's mu mirrors the params).
  state_fsdp = results[(2, 4, 1)][2]
  mlp = state_fsdp.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mlp.sharding.spec == P("fsdp", None)
  state_tp = results[(2, 2, 2)][2]
  mlp = state_tp.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  query = state_tp.params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert mlp.sharding.spec == P("fsdp", "tensor")
  assert query.sharding.spec == P("fsdp", "tensor", None)
  mu = state_tp.opt_state[1][0].mu["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")
  assert mlp.addressable_shards[0].data.shape == (32 // 2, 64 // 2)


def test_gradient_accumulation_equals_one_big_batch(mesh_runs, load_config):
  """accum_steps=4 (4 micro-batches of 4) equals the batch of 16 in one step, on the (2,2,2) mesh."""
  variables, batches, results = mesh_runs
  config = equivalence_config(load_config)
  config.accum_steps = 4
  with jax.default_matmul_precision("highest"):
    losses, state = run_steps(config, (2, 2, 2), batches, variables)
  expected_losses, expected_params, _ = results[(2, 2, 2)]
  np.testing.assert_allclose(losses, expected_losses, rtol=2e-6, atol=2e-6)
  assert_params_close(jax.device_get(state.params), expected_params, "accum_steps=4")


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(load_config, initial_variables):
  config = load_config()
  config.model.dtype = "bfloat16"
  losses, state = run_steps(config, (1, 1, 1), fixed_batches(2), initial_variables(config))
  assert np.all(np.isfinite(losses))
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim > 0}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_indivisible_dims_are_replicated():
  mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  # 3 heads on a tensor axis of 2 and width 6 on fsdp 4: replicated; 64 on fsdp 4: sharded.
  assert shd.spec_for(("embed", "heads", "kv"), (6, 3, 16), mesh) == P(None, None, None)
  assert shd.spec_for(("embed", "heads", "kv"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
  assert shd.spec_for(("embed", "classes"), (64, 10), mesh) == P("fsdp", None)


def test_mesh_sizes_and_errors():
  assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert shd.mesh_shape({"data": 2, "fsdp": 2, "tensor": -1}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    shd.mesh_shape({"data": 16, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    shd.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    shd.mesh_shape({"model": 2}, 8)


def test_schedule_matches_the_official_formula():
  total, warmup, base = 100, 10, 0.03
  sched = optim.learning_rate_schedule(base_lr=base, total_steps=total, warmup_steps=warmup, decay_type="cosine")
  for step in [0, 5, 10, 50, 99]:
    # vision_transformer utils.create_learning_rate_schedule
    progress = max(0.0, (step - warmup) / (total - warmup))
    expected = base * 0.5 * (1 + math.cos(math.pi * progress)) * min(1.0, step / warmup)
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
  linear = optim.learning_rate_schedule(base_lr=1e-3, total_steps=110, warmup_steps=10, decay_type="linear",
                                        linear_end=1e-5)
  assert float(linear(60)) == pytest.approx(1e-3 + (1e-5 - 1e-3) * 0.5, rel=1e-5)
  assert float(linear(110)) == pytest.approx(1e-5, rel=1e-4)


def test_weight_decay_touches_kernels_only():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "pos_embedding": jnp.ones((1, 3, 2))}
  mask = optim._decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "pos_embedding": False}


class _CompileCounter:
  """Counts XLA compilations (jax.monitoring events), to prove errors come before any compile."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=20), "batch_size=20 must be divisible by the data-parallel size"),
    (dict(accum_steps=4), "times accum_steps \\(4\\)"),
    (dict(mesh=dict(data=16, fsdp=1, tensor=1)), "needs 16 devices but only 8"),
    (dict(pretrained="/nonexistent/ViT-B_16.npz"), "does not exist"),
    (dict(image_size=9), "image size 9x9 is not divisible by the patch size 2x2"),
    (dict(model=dict(name="ViT-B16")), "Unknown model 'ViT-B16'. Did you mean 'ViT-B_16'"),
    (dict(optimizer="adamm"), "unknown optimizer 'adamm'"),
    (dict(dropout_rng_impl="philox"), "dropout_rng_impl must be one of"),
])
def test_bad_input_fails_at_start_before_compiling(tmp_path, change, message, load_config):
  config = load_config()
  with config.unlocked():
    for key, value in change.items():
      if isinstance(value, dict):
        value = ml_collections.ConfigDict(value) if key != "model" else ml_collections.ConfigDict(
            dict(config.model.to_dict(), **value))
      setattr(config, key, value)
  counter = _CompileCounter()
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert counter.count == 0


def test_pretrained_weights_start_the_run(tmp_path, load_config, initial_variables):
  """config.pretrained: an .npz of another class count and resolution loads with a zero head and a
  resized position embedding, directly into the sharded state."""
  from vit_jax.weights.core import flatten
  source = load_config()
  source.num_classes, source.image_size = 5, 8
  variables = initial_variables(source)
  path = tmp_path / "tiny.npz"
  np.savez(path, **{k: np.asarray(v) for k, v in flatten(variables["params"]).items()})

  config = load_config()
  config.image_size, config.pretrained = 16, str(path)  # 4x4 -> 8x8 patch grid, 5 -> 10 classes
  config.mesh.data, config.mesh.fsdp = 2, 4
  state = trainer.initial_state(config, trainer.validate(config))
  params = state.params
  assert params["head"]["kernel"].shape == (32, 10) and not np.any(np.asarray(params["head"]["kernel"]))
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 8 * 8, 32)
  np.testing.assert_array_equal(  # class-token row kept as is
      np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])[0, 0],
      variables["params"]["Transformer"]["posembed_input"]["pos_embedding"][0, 0])
  kernel = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", None)
  np.testing.assert_array_equal(np.asarray(kernel),
                                variables["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])


def test_scan_and_batchnorm_models_get_shardings(load_config):
  """Scanned layers (leading 'layers' axis, replicated) and MaxViT's batch_stats are part of the state."""
  mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  config = load_config()
  config.model.scan, config.model.depth, config.model.num_heads = True, 2, 4
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh)
  kernel = shardings.params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert abstract.params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (2, 32, 64)
  assert kernel.spec == P(None, "fsdp", "tensor")

  from vit_jax.models import registry
  maxvit = registry.get_model("MaxViT-T", num_classes=10, image_size=64)
  abstract, shardings = state_lib.state_shardings(maxvit, tx, mesh)
  stats = jax.tree.leaves(abstract.batch_stats)
  assert stats and all(x.dtype == jnp.float32 for x in stats)
  assert jax.tree.structure(shardings.batch_stats) == jax.tree.structure(abstract.batch_stats)


@pytest.mark.parametrize("name, arg", [
    ("digits", None), ("vit_finetune", "model=ViT-B_16,dataset=cifar10"),
    ("vit_finetune", "model=ViT-L_16,dataset=imagenet2012"), ("vit_pretrain", "recipe=i21k,model=ViT-B_16"),
    ("vit_pretrain", "recipe=augreg_i1k,model=ViT-S_16,aug=medium2"), ("crossvit", "model=CrossViT-15"),
    ("maxvit", "model=MaxViT-T"),
])
def test_recipe_configs_build(name, arg, load_config):
  """Every recipe names a real model, a valid optimiser/schedule and a model-compatible image size."""
  config = load_config(name, arg)
  config.num_classes = 10 if config.dataset == "digits" else 1000
  total, warmup = config_base.training_steps(config, train_examples=1_281_167 * 99 // 100)  # a train split
  assert 0 <= warmup < total
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config, total, warmup)
  abstract, _ = state_lib.state_shardings(model, tx, shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
  assert jax.tree.leaves(abstract.params)
  assert float(lr(warmup)) == pytest.approx(config.lr, rel=1e-3)
  if name == "maxvit":  # stochastic depth of the paper, from the registry's variant
    assert model.drop_path_rate == 0.2 and total == 300 * (1_281_167 * 99 // 100) // 4096
  if name == "vit_finetune":
    assert config.optimizer == "sgd" and config.momentum == 0.9 and config.grad_clip_norm == 1.0
    assert config.batch_size == 512 and config.image_size == 384 and config.decay_type == "cosine"


def test_recipe_arguments_are_checked(load_config):
  with pytest.raises(ValueError, match="unknown config argument 'modle'"):
    load_config("vit_finetune", "modle=ViT-B_16")
  with pytest.raises(ValueError, match="no fine-tuning preset for dataset 'cifar_10'"):
    load_config("vit_finetune", "dataset=cifar_10")


def test_eval_step_counts_top1_and_top5_once_and_ignores_padding(load_config, initial_variables,
                                                                 with_random_head):
  config = load_config()
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  variables = with_random_head(initial_variables(config), 3)  # so that top-1 and top-5 differ
  state = state_lib.create_train_state(model, tx, mesh, config.seed, variables)
  batch = fixed_batches(1, batch=16, seed=4)[0]
  batch["mask"] = np.arange(16) < 11  # the last 5 rows are padding
  sums = step_lib.make_eval_step(model, mesh, shardings)(
      state, to_global(batch, mesh, shd.EVAL_KEYS))
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(model.apply(variables, batch["image"], train=False))[:11]
  labels = batch["label"][:11]
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert float(sums["count"]) == 11
  assert float(sums["correct"]) == np.sum(np.argmax(logits, -1) == labels)
  assert float(sums["correct_top5"]) == np.sum(np.any(top5 == labels[:, None], axis=-1))
  assert float(sums["correct_top5"]) > float(sums["correct"])  # the two counts are really different


def test_mixup_and_cutmix_inside_the_train_step(load_config, initial_variables, with_random_head):
  config = load_config()
  config.lr, config.warmup_steps = 1e-2, 0
  mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  variables = with_random_head(initial_variables(config), 5)  # so that mixing changes the loss
  batch = to_global(fixed_batches(1)[0], mesh)

  def first_loss(mixup):
    state = state_lib.create_train_state(model, tx, mesh, config.seed, variables)
    train_step = step_lib.make_train_step(model, tx, lr, mesh, shardings, mixup=mixup)
    return float(train_step(state, batch)[1]["train_loss"])

  plain = first_loss(None)
  assert first_loss({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "switch_prob": 0.5}) == pytest.approx(plain, rel=1e-6)
  # A large alpha puts the mixing weight near 0.5, so each path surely changes the batch.
  mixed = first_loss({"mixup_alpha": 1000.0, "cutmix_alpha": 0.0, "switch_prob": 0.5})
  cut = first_loss({"mixup_alpha": 0.0, "cutmix_alpha": 1000.0, "switch_prob": 0.5})
  assert np.isfinite(mixed) and abs(mixed - plain) > 1e-3
  assert np.isfinite(cut) and abs(cut - plain) > 1e-3 and abs(cut - mixed) > 1e-3


def test_durations_in_steps_epochs_or_examples(load_config):
  """total_/warmup_ in steps, epochs or examples (exactly one form each), resolved from the train split's size."""
  from vit_jax.data import synthetic
  config = load_config()  # batch 16
  assert config_base.training_steps(config, 1000) == (20, 2)
  config.total_steps, config.total_epochs = None, 2.5
  config.warmup_steps, config.warmup_examples = None, 80
  assert config_base.training_steps(config, 160) == (25, 5)  # 2.5 x 160 / 16, 80 / 16
  setup = trainer.validate(config)  # synthetic data: a nominal epoch of NUM_TRAIN_EXAMPLES
  assert setup.train_examples == synthetic.NUM_TRAIN_EXAMPLES
  assert (setup.total_steps, setup.warmup_steps) == (int(2.5 * synthetic.NUM_TRAIN_EXAMPLES) // 16, 5)
  assert float(setup.lr_schedule(5)) == pytest.approx(config.lr)
  config.total_steps = 10
  with pytest.raises(ValueError, match="exactly one of total_steps, total_epochs, total_examples"):
    config_base.training_steps(config, 160)
  config.total_steps = config.total_epochs = None
  with pytest.raises(ValueError, match="got none of them"):
    config_base.training_steps(config, 160)
  config.total_epochs = 1.0
  with pytest.raises(ValueError, match="needs the size of the training split"):
    config_base.training_steps(config)


_CACHED_RUN = """
import importlib.util, json, sys
import jax
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
from vit_jax.train import trainer
spec = importlib.util.spec_from_file_location("testing", "configs/testing.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.update(dict(total_steps=2, warmup_steps=1, eval_every=0, checkpoint_every=0, compilation_cache_dir=sys.argv[2]))
trainer.train_and_evaluate(config, sys.argv[1])
print(json.dumps({k: events.count("/jax/compilation_cache/" + k) for k in ("cache_hits", "cache_misses")}))
"""


def test_a_second_start_loads_its_programs_from_the_compilation_cache(tmp_path):
  # Two processes, as a restarted run: the second compiles nothing (every program is a cache hit).
  import json
  import subprocess
  import sys

  def start(name):
    proc = subprocess.run([sys.executable, "-c", _CACHED_RUN, str(tmp_path / name), str(tmp_path / "cache")],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  first = start("first")
  assert first["cache_hits"] == 0 and first["cache_misses"] > 0, first
  entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
  assert len(entries) >= first["cache_misses"]
  second = start("second")
  assert second == {"cache_hits": first["cache_misses"], "cache_misses": 0}, (first, second)


def test_fast_dropout_generators_keep_the_run_a_function_of_seed_and_step(load_config, initial_variables,
                                                                         with_random_head):
  impl = "rbg"  # unsafe_rbg takes the same path (step.dropout_key) with another key implementation
  # Dropout masks drawn with an rbg key made from the step's key: the same state and batch give the same
  # update (a resumed run repeats the masks), the next step draws new masks, and the masks are not
  # threefry's.
  config = load_config()
  config.model.dropout_rate = 0.5
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = trainer.build_model(config)
  tx, lr = optim.make_optimizer(config)
  _, shardings = state_lib.state_shardings(model, tx, mesh)
  variables = with_random_head(initial_variables(config), 0)  # a zero head gives ln(10) whatever the masks
  state = state_lib.create_train_state(model, tx, mesh, config.seed, variables)
  batch = to_global(fixed_batches(1)[0], mesh)
  losses = {}
  for name in ("threefry", impl):
    step = step_lib.make_train_step(model, tx, lr, mesh, shardings, dropout_rng_impl=name)
    first = [float(step(jax.tree.map(jnp.copy, state), batch)[1]["train_loss"]) for _ in range(2)]
    moved = float(step(state.replace(step=state.step + 1), batch)[1]["train_loss"])  # donated: last use
    state = state_lib.create_train_state(model, tx, mesh, config.seed, variables)
    assert first[0] == first[1] and moved != first[0], (name, first, moved)
    losses[name] = first[0]
  assert losses[impl] != losses["threefry"]
  with pytest.raises(ValueError, match="dropout_rng_impl must be one of"):
    step_lib.make_train_step(model, tx, lr, mesh, shardings, dropout_rng_impl="philox")
