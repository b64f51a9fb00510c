"""Layers shared by the ViT, CrossViT and MaxViT families.

Parameters carry logical axis names (`nn.with_logical_partitioning`) so the
training code can map them onto a device mesh.  The names used across the
project are:

  embed    model width (residual stream)         -> usually sharded on `fsdp`
  mlp      MLP hidden width                      -> `tensor`
  heads    attention heads                       -> `tensor`
  kv       per-head width                        -> replicated
  classes  classifier outputs                    -> replicated
  conv_in  input channels of a convolution       -> replicated
  layers   the stacked axis of `nn.scan`         -> replicated
  (None)   small axes (kernel height/width, relative-position tables, ...)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

EMBED, MLP, HEADS, KV, CLASSES, CONV_IN, LAYERS = "embed", "mlp", "heads", "kv", "classes", "conv_in", "layers"
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# The collection `Attention` sows its probabilities into ([batch, heads, queries, keys], float32), only when an
# `apply` asks for it as mutable (`vit_jax.analysis.capture`); otherwise nothing extra is computed.
ATTENTION_WEIGHTS = "attention_weights"


def logical(init: Initializer, names: Sequence[Optional[str]]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(names))


def gelu(approximate: bool) -> Callable[[jax.Array], jax.Array]:
  """tanh-approximate GELU (official ViT / MaxViT) or exact erf GELU (timm, CrossViT)."""
  return functools.partial(nn.gelu, approximate=approximate)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dropout -> Dense -> Dropout, with submodules `Dense_0`, `Dense_1`."""
  mlp_dim: int
  out_dim: Optional[int] = None
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    out_dim = self.out_dim or x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(self.kernel_init, (EMBED, MLP)),
                 bias_init=logical(self.bias_init, (MLP,)), name="Dense_0")(x)
    x = gelu(self.approximate_gelu)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(self.kernel_init, (MLP, EMBED)),
                 bias_init=logical(self.bias_init, (EMBED,)), name="Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Attention(nn.Module):
  """Multi-head attention with the parameter layout of `flax.linen.MultiHeadDotProductAttention`.

  Submodules `query`, `key`, `value` (kernel [embed, heads, head_dim]) and `out`
  (kernel [heads, head_dim, embed]); this is also the layout of the official
  ViT and MaxViT checkpoints.  The product runs through
  `jax.nn.dot_product_attention` (`implementation` "xla" or "cudnn"); softmax is
  computed in float32.  `bias` ([heads, q, k] or [batch, heads, q, k]) is added
  to the logits (MaxViT's relative position bias).  Attention-probability
  dropout needs the probabilities, so with `dropout_rate > 0` in training the
  product is written out instead.  With the collection `ATTENTION_WEIGHTS`
  mutable, the probabilities are also sown there (computed on the side, so the
  output is the same with and without).
  """
  num_heads: int
  head_dim: Optional[int] = None
  out_features: Optional[int] = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, bias=None, deterministic: bool = True):
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.implementation!r}.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    features = inputs_q.shape[-1]
    head_dim = self.head_dim or features // self.num_heads
    if self.head_dim is None and features % self.num_heads:
      raise ValueError(f"width {features} is not divisible by num_heads={self.num_heads}.")
    proj = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, head_dim), axis=-1, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=logical(self.kernel_init, (EMBED, HEADS, KV)),
        bias_init=logical(self.bias_init, (HEADS, KV)))
    query = proj(name="query")(inputs_q)
    key = proj(name="key")(inputs_kv)
    value = proj(name="value")(inputs_kv)
    if bias is not None:
      bias = bias.astype(query.dtype)
      if bias.ndim == 3:
        bias = bias[None]
    if self.dropout_rate > 0.0 and not deterministic:
      probs = attention_probabilities(query, key, bias)
      probs = nn.Dropout(self.dropout_rate, broadcast_dims=())(probs, deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
    else:
      out = jax.nn.dot_product_attention(query, key, value, bias=bias,
                                         implementation=self.implementation)
    # `init` makes every collection but "intermediates" mutable: sow only when an apply asks for them.
    if self.is_mutable_collection(ATTENTION_WEIGHTS) and not self.is_initializing():
      self.sow(ATTENTION_WEIGHTS, "probs", attention_probabilities(query, key, bias))
    return nn.DenseGeneral(
        features=self.out_features or features, axis=(-2, -1), use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=logical(self.kernel_init, (HEADS, KV, EMBED)),
        bias_init=logical(self.bias_init, (EMBED,)), name="out")(out)


def attention_probabilities(query: jax.Array, key: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) in float32: [batch, heads, queries, keys] from [batch, tokens, heads, d]."""
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (scaled by 1/keep).

  The rate is a field, or a call argument when it is traced (one rate per layer under `nn.scan`).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, deterministic: bool, rate: float | jax.Array | None = None):
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def check_attention_implementation(implementation: str) -> None:
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {implementation!r}.")


def check_images(images, image_size, model: str) -> None:
  """ValueError unless `images` is an NHWC RGB batch of `image_size` (the size the model was built for)."""
  expected = to_2tuple(image_size)
  if images.ndim != 4 or tuple(images.shape[1:3]) != expected or images.shape[3] != 3:
    raise ValueError(f"{model} expects images [batch, {expected[0]}, {expected[1]}, 3] (NHWC), got "
                     f"{tuple(images.shape)}; resize the input, or build the model with "
                     "get_model(..., image_size=...) (load_pretrained resizes the position embeddings).")


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"expected an int or a (height, width) pair, got {size}.")
  return size


def check_divisible(image_size, patch_size, what: str = "patch size") -> tuple[int, int]:
  """Grid shape for `image_size` / `patch_size`, or a ValueError that names both and suggests sizes."""
  (h, w), (ph, pw) = to_2tuple(image_size), to_2tuple(patch_size)
  if h % ph or w % pw:
    near = sorted({max(ph, (h // ph) * ph), (h // ph + 1) * ph})
    raise ValueError(f"image size {h}x{w} is not divisible by the {what} {ph}x{pw}; "
                     f"use e.g. {' or '.join(str(n) for n in near)} px.")
  return h // ph, w // pw


def resize_grid(grid: np.ndarray | jax.Array, new_hw: tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resizes a [h, w, C] table of position embeddings to `new_hw`.

  `bilinear` equals `scipy.ndimage.zoom(order=1)` as the official ViT code uses
  it (corner-aligned linear interpolation); `bicubic` equals PyTorch's
  `F.interpolate(mode='bicubic', align_corners=False)` as timm uses it.
  """
  grid = jnp.asarray(grid, jnp.float32)
  (h, w), (nh, nw) = grid.shape[:2], new_hw
  if (h, w) == (nh, nw):
    return grid
  if method == "bilinear":
    # scipy.ndimage.zoom maps output i to input i * (h - 1) / (nh - 1) (grid_mode=False).
    def interp_axis(x, n_out, axis):
      n_in = x.shape[axis]
      pos = jnp.linspace(0.0, n_in - 1, n_out) if n_out > 1 else jnp.zeros((1,))
      lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
      hi = jnp.clip(lo + 1, 0, n_in - 1)
      frac = (pos - lo).reshape((-1,) + (1,) * (x.ndim - axis - 1))
      return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
    return interp_axis(interp_axis(grid, nh, 0), nw, 1)
  if method == "bicubic":
    return jax.image.scale_and_translate(
        grid, (nh, nw, grid.shape[2]), (0, 1), jnp.array([nh / h, nw / w]), jnp.zeros(2),
        method="cubic-pytorch", antialias=False)
  raise ValueError(f"unknown resize method {method!r}; use 'bilinear' or 'bicubic'.")


def _tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] interpolation matrix of TF2 bilinear resize (half-pixel centres, edge clamp)."""
  # Positions rounded to float32 as TF computes them (the official model resized on the fly).
  scale = np.float32(n_in) / np.float32(n_out)
  position = ((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)).astype(np.float64)
  floor = np.floor(position)
  lower = np.clip(floor, 0, n_in - 1).astype(int)
  upper = np.clip(np.ceil(position), 0, n_in - 1).astype(int)
  frac = position - floor
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.arange(n_out), lower), 1 - frac)
  np.add.at(matrix, (np.arange(n_out), upper), frac)
  return matrix


def resize_relative_bias(table, new_window: tuple[int, int]) -> np.ndarray:
  """Resizes a [heads, 2ph-1, 2pw-1] table (numpy, at load time) to the window `new_window`.

  TF2 `tf.image.resize` bilinear (half-pixel centres, no antialiasing), which
  is what the official code applies when it fine-tunes at 384/512 from the
  13x13 tables of 224 (sample positions rounded to float32 as in TF).
  """
  table = np.asarray(table, np.float64)
  _, h, w = table.shape
  nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
  if (h, w) == (nh, nw):
    return table.astype(np.float32)
  rows, cols = _tf_bilinear_matrix(h, nh), _tf_bilinear_matrix(w, nw)
  return np.einsum("oh,nhw,pw->nop", rows, table, cols).astype(np.float32)


# ----------------------------------------------------------------------------- activation sharding

# Set while the train/eval step is traced (`vit_jax.train.step`): (sharding of a batch-leading array of rank
# n, the data-parallel size).  Without it (a single device, predict, tests) `constrain_batch` does nothing.
_BATCH_SHARDING: contextvars.ContextVar = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def shard_activations(sharding_for_rank: Callable[[int], Any], data_parallel: int):
  """Within: `constrain_batch` keeps activations split over the batch (data x fsdp)."""
  token = _BATCH_SHARDING.set((sharding_for_rank, data_parallel))
  try:
    yield
  finally:
    _BATCH_SHARDING.reset(token)


def constrain_batch(x):
  """`x` [batch, ...] split over the data-parallel devices, the rest replicated.

  Without it GSPMD may follow the FSDP-sharded `embed` dim of the weights into the residual stream and
  all-reduce activations in every layer instead of all-gathering the (much smaller) weights: ViT-B/16 at
  batch 256 on v5e:2x2 moved 16.5 GiB per step in the layer loop (`python -m vit_jax.aot`)."""
  value = _BATCH_SHARDING.get()
  if value is None or x.shape[0] % value[1]:
    return x
  return jax.lax.with_sharding_constraint(x, value[0](x.ndim))
