"""MaxViT: parity with timm `maxvit_*_tf_*` (tiny fixture), official TF checkpoints, and the tricky pieces.

Reference numbers come from `tests/fixtures/make_maxvit_fixtures.py` (timm 1.0.31,
random BN statistics and norm scales) and the paper/timm parameter counts.
"""
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import vit_jax
from vit_jax.models import layers, maxvit
from vit_jax.weights import core

# Mirrors TINY in tests/fixtures/make_maxvit_fixtures.py.
TINY = dict(num_classes=10, image_size=64, depths=(1, 2), embed_dims=(24, 32), stem_width=16, head_dim=8,
            head_hidden_size=32, window_size=4)


def tiny_model(**overrides):
  options = dict(TINY, drop_path_rate=0.0)
  options.update(overrides)
  return vit_jax.get_model("MaxViT-T", **options)


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "maxvit"


@pytest.fixture(scope="module")
def reference():
  return load_file(str(FIXTURES / "tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def timm_state():
  return load_file(str(FIXTURES / "tiny_timm.safetensors"))


@pytest.fixture(scope="module")
def tiny_variables(timm_state):
  return vit_jax.load_pretrained(timm_state, model=tiny_model())


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  def apply(variables, images):
    with jax.default_matmul_precision("highest"):
      return model.apply(variables, images, capture_intermediates=lambda m, _: m.name == "stem_conv2")
  return jax.jit(apply)


def eval_logits(model, variables, images):
  logits, state = _jitted_apply(model)(variables, images)
  return np.asarray(logits), np.asarray(state["intermediates"]["stem_conv2"]["__call__"][0])


# ----------------------------------------------------------------------------- sizes

# The native 224 px counts of every MaxViT are checked in tests/test_models.py.
@pytest.mark.parametrize("name,size,count", [
    ("MaxViT-XL", 384, 475_323_472), ("MaxViT-T", 384, 30_977_008), ("MaxViT-T", 512, 31_049_584)])
def test_parameter_count_matches_timm(name, size, count):
  shapes = core.abstract_variables(vit_jax.get_model(name, image_size=size))
  params = sum(int(np.prod(s.shape)) for k, s in shapes.items() if k.startswith("params/"))
  assert params == count
  window = size // 32
  assert shapes["params/block_0_0/grid_attn/relative_bias"].shape[1:] == (2 * window - 1,) * 2


def test_image_size_that_does_not_fit_lists_nearest_sizes():
  with pytest.raises(ValueError, match=r"height 240 .*window 7.*Nearest heights that fit: 224 or 256"):
    vit_jax.get_model("MaxViT-T", image_size=240)
  with pytest.raises(ValueError, match=r"width 300 .*288 or 320"):
    vit_jax.get_model("MaxViT-T", image_size=(224, 300))
  with pytest.raises(ValueError, match="block_order must be an ordering"):
    vit_jax.get_model("MaxViT-T", block_order=("mbconv", "grid"))
  assert vit_jax.get_model("MaxViT-T", image_size=(224, 320)).windows() == (7, 10)
  assert "MaxViT-XL" in vit_jax.list_models("maxvit")


# ----------------------------------------------------------------------------- pieces

def test_window_and_grid_partition_layout_and_inverse():
  h, w, c = 8, 12, 2
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  x = jnp.asarray(np.stack([rows, cols], -1)[None].repeat(2, 0).astype(np.float32))   # pixel coordinates
  x = x.at[1].add(100.0)
  p = (2, 3)
  windows = maxvit.window_partition(x, p)
  assert windows.shape == (2 * 4 * 4, 2, 3, c)
  # Window (i, j) element (a, b) is pixel (i*ph + a, j*pw + b).
  np.testing.assert_array_equal(windows[1 * 4 + 2, 1, 2], [1 * 2 + 1, 2 * 3 + 2])
  grid = maxvit.grid_partition(x, p)
  nh, nw = h // p[0], w // p[1]
  for i, j, a, b in [(0, 0, 0, 0), (1, 2, 1, 1), (3, 3, 1, 2), (2, 1, 0, 2)]:
    # Grid window (i, j) element (a, b) is pixel (a*H/G + i, b*W/G + j): dilated over the image.
    np.testing.assert_array_equal(grid[i * nw + j, a, b], [a * nh + i, b * nw + j])
  np.testing.assert_array_equal(grid[nh * nw], x[1, :: nh, :: nw])   # second image, first grid window
  np.testing.assert_array_equal(maxvit.window_unpartition(windows, p, (h, w)), x)
  np.testing.assert_array_equal(maxvit.grid_unpartition(grid, p, (h, w)), x)


def test_relative_bias_lookup_is_key_minus_query():
  ph, pw = 2, 3
  table = np.random.default_rng(0).normal(size=(2, 2 * ph - 1, 2 * pw - 1)).astype(np.float32)
  bias = np.asarray(maxvit.relative_bias(jnp.asarray(table), (ph, pw)))
  assert bias.shape == (2, ph * pw, ph * pw)
  for q in range(ph * pw):
    for k in range(ph * pw):
      (qr, qc), (kr, kc) = divmod(q, pw), divmod(k, pw)
      np.testing.assert_array_equal(bias[:, q, k], table[:, kr - qr + ph - 1, kc - qc + pw - 1])
  # Query (0,0) attending to key (1,2): table index (1-0+1, 2-0+2) = (2, 4), the far corner.
  np.testing.assert_array_equal(bias[:, 0, 5], table[:, 2, 4])


def test_relative_bias_resize_equals_tf_image_resize():
  import tensorflow as tf
  table = np.random.default_rng(1).normal(size=(3, 13, 13)).astype(np.float32)
  for window, size in [(12, 23), (16, 31), (4, 7)]:   # 224 -> 384, 224 -> 512, and a downsize
    ours = np.asarray(layers.resize_relative_bias(table, (window, window)))
    theirs = tf.squeeze(tf.image.resize(table[..., None], [size, size]), -1).numpy()   # TF2 default: bilinear
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- timm parity

def test_logits_match_timm(tiny_variables, reference):
  model = tiny_model()
  logits, stem = eval_logits(model, tiny_variables, reference["images_nhwc"])
  # The stem alone catches TF-'SAME' padding and BN eps mistakes.
  np.testing.assert_allclose(stem, reference["stem_nhwc"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-5, rtol=0)
  assert set(tiny_variables) == {"params", "batch_stats"}


def test_export_timm_round_trips_the_state_dict(tiny_variables, timm_state, tmp_path):
  path = tmp_path / "maxvit.safetensors"
  exported = vit_jax.export_timm(tiny_variables, model=tiny_model(), path=str(path))
  assert sorted(exported) == sorted(timm_state)   # num_batches_tracked included: timm loads it strictly
  for key, value in timm_state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert sorted(load_file(str(path))) == sorted(timm_state)


def test_checkpoint_of_another_shape_is_reported(timm_state):
  with pytest.raises(core.CheckpointMismatchError,
                     match=r"missing .*block_1_1.*\n.*unexpected(.|\n)*has 1 params/block_1_\* layers .* model has 2"):
    vit_jax.load_pretrained({k: v for k, v in timm_state.items() if "stages.1.blocks.1." not in k}
                            | {"stages.2.blocks.0.conv.conv1_1x1.weight": np.zeros((1, 1, 1, 1))},
                            model=tiny_model())


def test_new_head_and_larger_window_load(timm_state, tiny_variables):
  import tensorflow as tf
  model = tiny_model(image_size=128, window_size=8, num_classes=3)
  variables = vit_jax.load_pretrained(timm_state, model=model)
  params = variables["params"]
  assert params["head"]["kernel"].shape == (32, 3) and not np.any(params["head"]["kernel"])
  table = timm_state["stages.1.blocks.1.attn_grid.attn.rel_pos.relative_position_bias_table"]
  expected = tf.squeeze(tf.image.resize(table[..., None], [15, 15]), -1).numpy()
  np.testing.assert_allclose(params["block_1_1"]["grid_attn"]["relative_bias"], expected, atol=1e-6)
  np.testing.assert_array_equal(params["block_0_0"]["mbconv"]["expand_conv"]["kernel"],
                                tiny_variables["params"]["block_0_0"]["mbconv"]["expand_conv"]["kernel"])


# ----------------------------------------------------------------------------- official TF checkpoints

def _timm_to_official_tf(state):
  """timm names/layouts -> the official Keras variable names and layouts (independent of our converter)."""
  mbconv = {"pre_norm": "pre_norm", "conv1_1x1": "expand_conv", "norm1": "expand_norm",
            "conv2_kxk": "depthwise_conv", "norm2": "depthwise_norm", "se.fc1": "se/reduce_conv2d",
            "se.fc2": "se/expand_conv2d", "conv3_1x1": "shrink_conv", "shortcut.expand": "shortcut_conv"}
  norm_leaf = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
  out = {}
  for name, value in state.items():
    if name.endswith("num_batches_tracked"):
      continue
    module, leaf = name.rsplit(".", 1)
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(\w+)\.(.+)", module)
    if module.startswith("stem."):
      scope = {"stem.conv1": "stem/conv_0", "stem.norm1": "stem/norm_0", "stem.conv2": "stem/conv_1"}[module]
    elif module.startswith("head."):
      scope = {"head.norm": "final_layer_norm", "head.pre_logits.fc": "cls_head/inner_dense",
               "head.fc": "cls_head/logit_dense"}[module]
    else:
      block, kind, rest = f"block_{int(m[1]):02d}_{int(m[2]):02d}", m[3], m[4]
      suffix = "_1" if kind == "attn_grid" else ""
      if kind == "conv":
        scope = f"mbconv/{mbconv[rest]}"
      elif rest == "attn.rel_pos":
        out[f"maxvit/{block}/attention{suffix}/relative_bias"] = value
        continue
      elif rest == "attn.qkv":
        heads = value.shape[0] // (3 * 8)   # head_dim 8
        parts = value.reshape(3, heads, 8, *value.shape[1:])
        for i, p in enumerate("qkv"):
          out[f"maxvit/{block}/attention{suffix}/{p}/{'weight' if leaf == 'weight' else 'bias'}"] = (
              parts[i].transpose(2, 0, 1) if leaf == "weight" else parts[i])
        continue
      elif rest == "attn.proj":
        out[f"maxvit/{block}/attention{suffix}/o/{leaf}"] = (
            value.T.reshape(-1, 8, value.shape[0]) if leaf == "weight" else value)
        continue
      else:
        scope = {"norm1": f"attn_layer_norm{suffix}", "norm2": f"ffn_layer_norm{suffix}",
                 "mlp.fc1": f"ffn{suffix}/expand_dense", "mlp.fc2": f"ffn{suffix}/shrink_dense"}[rest]
      scope = f"{block}/{scope}"
    if "norm" in scope.rsplit("/", 1)[-1]:
      out[f"maxvit/{scope}/{norm_leaf[leaf]}"] = value
    elif value.ndim == 4 and scope.endswith("depthwise_conv"):
      out[f"maxvit/{scope}/depthwise_kernel"] = value.transpose(2, 3, 0, 1)   # (C,1,k,k) -> (k,k,C,1)
    elif value.ndim == 4:
      out[f"maxvit/{scope}/{'kernel' if leaf == 'weight' else leaf}"] = value.transpose(2, 3, 1, 0)
    else:   # TrailDense
      out[f"maxvit/{scope}/{leaf}"] = value.T if value.ndim == 2 else value
  return out


def test_official_tf_checkpoint_loads_with_ema(timm_state, tiny_variables, reference, tmp_path):
  import tensorflow as tf
  official = _timm_to_official_tf(timm_state)
  rng = np.random.default_rng(0)
  tensors = {}
  for name, value in official.items():
    if name.rsplit("/", 1)[-1] in ("moving_mean", "moving_variance"):
      tensors[name] = value                                      # BN statistics: no EMA copy
    else:
      tensors[name] = rng.normal(size=value.shape).astype(np.float32)   # raw weights: must NOT be used
      tensors[f"{name}/ExponentialMovingAverage"] = value
  tensors["global_step"] = np.array(1000, np.int64)
  tensors["maxvit/stem/conv_0/kernel/Momentum"] = np.zeros_like(official["maxvit/stem/conv_0/kernel"])
  prefix = str(tmp_path / "model.ckpt-1000")
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])

  variables = vit_jax.load_pretrained(prefix, model=tiny_model())
  flat_tf, flat_timm = core.flatten(variables), core.flatten(tiny_variables)
  assert sorted(flat_tf) == sorted(flat_timm)
  for key in flat_timm:
    np.testing.assert_allclose(flat_tf[key], flat_timm[key], atol=1e-7, rtol=0, err_msg=key)
  logits, _ = eval_logits(tiny_model(), variables, reference["images_nhwc"])
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- training

# One stage of two blocks (the second one drops with rate/2) and a shortcut conv (8 -> 16
# channels): every kind of variable, cheaper to compile than TINY.
MICRO = dict(num_classes=5, image_size=32, depths=(2,), embed_dims=(16,), stem_width=8, head_dim=8,
             head_hidden_size=16, window_size=4)


def micro_model(**overrides):
  return vit_jax.get_model("MaxViT-T", **dict(MICRO, drop_path_rate=0.0) | overrides)


def random_variables(model, seed=0):
  """Variables of `model` filled from numpy (no init compile); positive BN variances."""
  rng = np.random.default_rng(seed)
  flat = {k: rng.normal(0.0, 0.2, s.shape).astype(np.float32) for k, s in core.abstract_variables(model).items()}
  flat = {k: (np.abs(v) + 0.5 if k.endswith("/var") else v) for k, v in flat.items()}
  return core.unflatten(flat)


def train_forward(model, variables, images, rng=None):
  with jax.default_matmul_precision("highest"):
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={} if rng is None else {"dropout": rng})
  return logits, updates["batch_stats"]


def test_train_step_gradients_drop_path_and_batch_stats():
  model = micro_model(drop_path_rate=0.5)
  variables = random_variables(model)
  images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)

  def loss(params, rng):
    logits, stats = train_forward(model, {"params": params, "batch_stats": variables["batch_stats"]}, images, rng)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0] ** 2), (logits, stats)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, (logits, stats)), grads = step(variables["params"], jax.random.key(1))
  assert np.isfinite(value)
  flat_grads, flat_params = core.flatten(grads), core.flatten(variables["params"])
  assert {k: v.shape for k, v in flat_grads.items()} == {k: v.shape for k, v in flat_params.items()}
  assert all(np.all(np.isfinite(g)) for g in flat_grads.values())
  # The relative-bias tables receive gradient (google-research/maxvit#7).
  assert np.any(flat_grads["block_0_0/grid_attn/relative_bias"] != 0)
  # Training mode (batch statistics, stochastic depth) differs from eval; the running statistics move.
  eval_out = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  assert np.abs(np.asarray(logits) - np.asarray(eval_out)).max() > 1e-3
  # Stochastic depth is active: another dropout key gives other logits.
  (_, (other, _)), _ = step(variables["params"], jax.random.key(2))
  assert np.abs(np.asarray(logits) - np.asarray(other)).max() > 1e-3
  old, new = variables["batch_stats"]["stem_norm"]["mean"], stats["stem_norm"]["mean"]
  assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-4
  # remat=True traces with the same variables and output (checked abstractly: no second compile).
  out = jax.eval_shape(functools.partial(train_forward, micro_model(remat=True)), variables, images,
                       jax.random.key(1))
  assert out[0].shape == (4, 5)


def test_stochastic_depth_schedule_is_official():
  # Official: survival = 1 - rate * block_index / total_blocks (block 0 never drops, last < rate).
  rates = maxvit.drop_path_rates(0.2, (2, 2, 5, 2))
  assert len(rates) == 11 and rates[0] == 0.0
  np.testing.assert_allclose(rates[-1], 0.2 * 10 / 11)
  np.testing.assert_allclose(rates[4], 0.2 * 4 / 11)


def test_batchnorm_statistics_do_not_depend_on_the_number_of_devices():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  assert len(devices) == 8
  model = micro_model()
  variables = random_variables(model)
  images = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype(np.float32)

  one_logits, one_stats = jax.jit(functools.partial(train_forward, model))(variables, images)
  mesh = Mesh(np.array(devices), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  jit_logits, jit_stats = jax.jit(functools.partial(train_forward, model))(variables, sharded)
  assert len(jit_logits.sharding.device_set) == 8
  # shard_map: every device sees 1 image; bn_axis_name averages the statistics over the mesh.
  per_device = jax.shard_map(functools.partial(train_forward, micro_model(bn_axis_name="data")), mesh=mesh,
                             in_specs=(P(), P("data")), out_specs=(P("data"), P()))
  map_logits, map_stats = jax.jit(per_device)(variables, sharded)
  for logits, new_stats in [(jit_logits, jit_stats), (map_logits, map_stats)]:
    np.testing.assert_allclose(logits, one_logits, atol=1e-5, rtol=0)
    for key, value in core.flatten(one_stats).items():
      np.testing.assert_allclose(core.flatten(new_stats)[key], value, atol=1e-5, rtol=1e-5, err_msg=key)


def test_block_order_ablation_builds():
  model = tiny_model(block_order=("block", "grid", "mbconv"))
  images = jnp.zeros((1, 64, 64, 3))
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), images)
  variables = nn.meta.unbox(variables)
  assert out.shape == (1, 10)
  # Attention before the downsampling MBConv runs at the previous width: 16 / head_dim 8 = 2 heads.
  assert variables["params"]["block_0_0"]["block_attn"]["relative_bias"].shape == (2, 7, 7)
  with pytest.raises(ValueError, match="block_order must be an ordering"):
    tiny_model(block_order=("mbconv", "block", "block"))


def test_bfloat16_computation_keeps_float32_parameters_and_logits():
  model = micro_model(dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 32, 3))
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), images)
  assert out.dtype == jnp.float32 and out.shape == (2, 5)
  assert {v.dtype for v in core.flatten(nn.meta.unbox(variables)).values()} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------- the parity test can fail

@pytest.mark.parametrize("control", [dict(ln_epsilon=1e-6), dict(bn_epsilon=1e-5), dict(approximate_gelu=False)])
def test_parity_tolerance_is_discriminating(control, tiny_variables, reference):
  """Each detail a port gets wrong must fail the logit tolerance: LayerNorm eps 1e-6 (not timm/TF's 1e-5),
  BatchNorm eps 1e-5 (PyTorch's default, not TF's 1e-3), the exact erf GELU (not the tanh one)."""
  logits, _ = eval_logits(tiny_model(**control), tiny_variables, reference["images_nhwc"])
  assert np.abs(logits - reference["logits"]).max() > 10 * 1e-5, control
