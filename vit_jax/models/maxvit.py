"""MaxViT (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022) in Flax linen.

Numerically equal to the official TF code (google-research/maxvit) and to
timm's `maxvit_*_tf_*` ports of its weights:

  stem     Conv3x3/2 (TF 'SAME') -> BatchNorm -> GELU -> Conv3x3
  block    MBConv -> block (window) attention + MLP -> grid attention + MLP
  head     global average pool -> LayerNorm -> Dense -> tanh -> Dense

The details that decide parity (each one is easy to get wrong): BatchNorm eps
1e-3, LayerNorm eps 1e-5, tanh-approximate GELU, SiLU in squeeze-excite,
expansion/SE widths from the block's *output* width, TF 'SAME' padding on the
stride-2 convolutions (pads bottom/right only), relative bias looked up as
`table[h, key - query + P - 1]`, softmax in float32.

Variables: `params` and, for the BatchNorms, `batch_stats` (updated with
`mutable=['batch_stats']` when `train=True`, frozen otherwise).
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, registry
from vit_jax.models.layers import CLASSES, CONV_IN, EMBED, HEADS, MLP, logical

Dtype = Any
BLOCK_LAYERS = ("mbconv", "block", "grid")
# The official code initialises every kernel with N(0, 0.02) and every bias with 0.
_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
_ZEROS = nn.initializers.zeros


# ----------------------------------------------------------------------------- partitions

def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B * H/ph * W/pw, ph, pw, C]: non-overlapping local windows."""
  ph, pw = window
  return einops.rearrange(x, "b (nh ph) (nw pw) c -> (b nh nw) ph pw c", ph=ph, pw=pw)


def window_unpartition(windows: jax.Array, window: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition` for a [H, W] feature map."""
  (ph, pw), (h, w) = window, hw
  return einops.rearrange(windows, "(b nh nw) ph pw c -> b (nh ph) (nw pw) c", nh=h // ph, nw=w // pw)


def grid_partition(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B * H/gh * W/gw, gh, gw, C]: dilated, image-wide windows.

  Element (a, b) of window (i, j) is pixel (a * H/gh + i, b * W/gw + j).
  """
  gh, gw = grid
  return einops.rearrange(x, "b (gh nh) (gw nw) c -> (b nh nw) gh gw c", gh=gh, gw=gw)


def grid_unpartition(windows: jax.Array, grid: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
  """Inverse of `grid_partition` for a [H, W] feature map."""
  (gh, gw), (h, w) = grid, hw
  return einops.rearrange(windows, "(b nh nw) gh gw c -> b (gh nh) (gw nw) c", nh=h // gh, nw=w // gw)


# ----------------------------------------------------------------------------- relative position bias

def relative_bias_index(window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Row/column indices into a [heads, 2ph-1, 2pw-1] table for every (query, key) pair.

  As the official `reindex_2d_einsum_lookup`: key minus query (the flip of
  Swin's query-minus-key), so bias[h, q, k] = table[h, kr-qr+ph-1, kc-qc+pw-1].
  """
  ph, pw = window
  rows, cols = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  return rows[None, :] - rows[:, None] + ph - 1, cols[None, :] - cols[:, None] + pw - 1


def relative_bias(table: jax.Array, window: tuple[int, int]) -> jax.Array:
  """[heads, 2ph-1, 2pw-1] table -> [heads, ph*pw, ph*pw] additive attention bias."""
  row, col = relative_bias_index(window)
  return table[:, row, col]


# ----------------------------------------------------------------------------- sizes

def drop_path_rates(rate: float, depths: Sequence[int]) -> list[float]:
  """Per-block stochastic depth as the official code: rate * b / N for block b of N (block 0: 0).

  (timm instead uses linspace(0, rate, N), whose last block gets the full rate.)
  """
  total = sum(depths)
  return [rate * b / total for b in range(total)]


def _halve(n: int) -> int:
  return -(-n // 2)  # stride-2 'SAME' output size


def stage_sizes(size: int, num_stages: int) -> list[int]:
  """Feature size (one axis) after the stem and after every stage: [stem, stage 1, stage 2, ...]."""
  sizes = [_halve(size)]
  for _ in range(num_stages):
    sizes.append(_halve(sizes[-1]))
  return sizes


def default_window(size: int) -> int:
  return size // 32  # timm's partition_ratio; 224 -> 7, 384 -> 12, 512 -> 16


def _attention_sizes(size: int, num_stages: int, block_order: Sequence[str]) -> list[int]:
  """Feature sizes (one axis) at which a block or grid attention runs."""
  sizes = stage_sizes(size, num_stages)
  # Attention placed before the MBConv of a stage's first block sees the previous resolution.
  attention_first = list(block_order).index("mbconv") > 0
  return sizes[1:] + (sizes[:-1] if attention_first else [])


def _fits(size: int, window: Optional[int], num_stages: int, block_order: Sequence[str]) -> bool:
  p = default_window(size) if window is None else window
  return p > 0 and all(s % p == 0 for s in _attention_sizes(size, num_stages, block_order))


def _nearest_fitting(size: int, window: Optional[int], num_stages: int, block_order) -> list[int]:
  below = next((s for s in range(size - 1, 0, -1) if _fits(s, window, num_stages, block_order)), None)
  above = next(s for s in itertools.count(size + 1) if _fits(s, window, num_stages, block_order))
  return [s for s in (below, above) if s is not None]


def check_image_size(image_size, window_size, num_stages: int,
                     block_order: Sequence[str] = BLOCK_LAYERS) -> tuple[int, int]:
  """The (height, width) window for `image_size`, or a ValueError listing the nearest sizes that fit."""
  hw = layers.to_2tuple(image_size)
  windows = (None, None) if window_size is None else layers.to_2tuple(window_size)
  out = []
  for axis, size, window in zip(("height", "width"), hw, windows):
    if not _fits(size, window, num_stages, block_order):
      p = default_window(size) if window is None else window
      how = "image_size // 32" if window is None else "window_size"
      near = " or ".join(map(str, _nearest_fitting(size, window, num_stages, block_order)))
      raise ValueError(
          f"MaxViT image {axis} {size} does not fit the window {p} ({how}): the feature maps "
          f"{_attention_sizes(size, num_stages, block_order)} must all be divisible by it. "
          f"Nearest {axis}s that fit: {near} (or pass another window_size).")
    out.append(default_window(size) if window is None else window)
  return tuple(out)


# ----------------------------------------------------------------------------- modules

class _Common(nn.Module):
  """Options shared by every MaxViT submodule (set once by `MaxViT`)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  approximate_gelu: bool = True
  bn_axis_name: Optional[str] = None
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  ln_epsilon: float = 1e-5

  def batch_norm(self, train: bool, name: str, names=(EMBED,)):
    return nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        axis_name=self.bn_axis_name, use_fast_variance=False, dtype=self.dtype,
        param_dtype=self.param_dtype, scale_init=logical(nn.initializers.ones, names),
        bias_init=logical(_ZEROS, names), name=name)

  def conv(self, features: int, kernel: int, name: str, names, *, strides: int = 1,
           groups: int = 1, use_bias: bool = True):
    # Flax 'SAME' is TF 'SAME' (extra padding at the bottom/right for stride 2).
    return nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME",
                   feature_group_count=groups, use_bias=use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=logical(_KERNEL_INIT, names),
                   bias_init=logical(_ZEROS, names[-1:]), name=name)

  def layer_norm(self, name: str):
    return nn.LayerNorm(epsilon=self.ln_epsilon, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, scale_init=logical(nn.initializers.ones, (EMBED,)),
                        bias_init=logical(_ZEROS, (EMBED,)), name=name)

  def gelu(self, x):
    return layers.gelu(self.approximate_gelu)(x)


class MBConv(_Common):
  """Pre-norm inverted bottleneck: BN -> 1x1 (x4) -> BN-GELU -> dw3x3 -> BN-GELU -> SE -> 1x1."""
  features: int = 64
  strides: int = 1
  expand_ratio: int = 4
  se_ratio: float = 0.25
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    inner = self.features * self.expand_ratio     # from the OUTPUT width, also when downsampling
    se_width = max(1, int(self.features * self.se_ratio))
    shortcut = x
    if self.strides > 1:
      # TF avg_pool 'same' excludes the padding from the mean.
      shortcut = nn.avg_pool(shortcut, (self.strides,) * 2, (self.strides,) * 2, padding="SAME",
                             count_include_pad=False)
    if x.shape[-1] != self.features:
      shortcut = self.conv(self.features, 1, "shortcut_conv", (None, None, CONV_IN, EMBED))(shortcut)

    y = self.batch_norm(train, "pre_norm")(x)
    y = self.conv(inner, 1, "expand_conv", (None, None, EMBED, MLP), use_bias=False)(y)
    y = self.gelu(self.batch_norm(train, "expand_norm", (MLP,))(y))
    y = self.conv(inner, 3, "depthwise_conv", (None, None, None, MLP), strides=self.strides,
                  groups=inner, use_bias=False)(y)
    y = self.gelu(self.batch_norm(train, "depthwise_norm", (MLP,))(y))
    # Squeeze-excite (SiLU, sigmoid gate) on the global mean.
    s = jnp.mean(y, axis=(1, 2), keepdims=True)
    s = nn.silu(self.conv(se_width, 1, "se_reduce", (None, None, MLP, None))(s))
    s = self.conv(inner, 1, "se_expand", (None, None, None, MLP))(s)
    y = y * nn.sigmoid(s)
    y = self.conv(self.features, 1, "shrink_conv", (None, None, MLP, EMBED))(y)
    return shortcut + layers.DropPath(self.drop_path_rate)(y, deterministic=not train)


class PartitionAttention(_Common):
  """x + Attn(LN(x)) over windows ('block') or a dilated grid ('grid'), then x + MLP(LN(x))."""
  kind: str = "block"
  window: tuple[int, int] = (7, 7)
  head_dim: int = 32
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_implementation: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    _, h, w, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"MaxViT width {c} is not divisible by head_dim={self.head_dim}.")
    num_heads = c // self.head_dim
    partition, unpartition = {"block": (window_partition, window_unpartition),
                              "grid": (grid_partition, grid_unpartition)}[self.kind]
    ph, pw = self.window
    table = self.param("relative_bias", logical(_KERNEL_INIT, (HEADS, None, None)),
                       (num_heads, 2 * ph - 1, 2 * pw - 1), self.param_dtype)

    y = partition(self.layer_norm("attn_norm")(x), self.window)
    y = y.reshape(y.shape[0], ph * pw, c)
    y = layers.Attention(num_heads=num_heads, head_dim=self.head_dim,
                         implementation=self.attention_implementation, dtype=self.dtype,
                         param_dtype=self.param_dtype, kernel_init=_KERNEL_INIT, bias_init=_ZEROS,
                         name="attention")(y, bias=relative_bias(table, self.window))
    y = unpartition(y.reshape(-1, ph, pw, c), self.window, (h, w))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path_rate)(y, deterministic=not train)

    y = layers.MlpBlock(mlp_dim=c * self.mlp_ratio, dropout_rate=self.dropout_rate,
                        approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=_KERNEL_INIT, bias_init=_ZEROS,
                        name="mlp")(self.layer_norm("mlp_norm")(x), deterministic=not train)
    return x + layers.DropPath(self.drop_path_rate)(y, deterministic=not train)


class MaxViTBlock(_Common):
  """MBConv, block attention and grid attention (each with its MLP) in `block_order`."""
  features: int = 64
  strides: int = 1
  window: tuple[int, int] = (7, 7)
  head_dim: int = 32
  expand_ratio: int = 4
  se_ratio: float = 0.25
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_implementation: str = "xla"
  block_order: tuple[str, ...] = BLOCK_LAYERS

  @nn.compact
  def __call__(self, x, train: bool):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu,
                  bn_axis_name=self.bn_axis_name, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, ln_epsilon=self.ln_epsilon)
    for layer in self.block_order:
      if layer == "mbconv":
        x = MBConv(features=self.features, strides=self.strides, expand_ratio=self.expand_ratio,
                   se_ratio=self.se_ratio, drop_path_rate=self.drop_path_rate, name="mbconv",
                   **common)(x, train)
      else:
        x = PartitionAttention(kind=layer, window=self.window, head_dim=self.head_dim,
                               mlp_ratio=self.mlp_ratio, dropout_rate=self.dropout_rate,
                               drop_path_rate=self.drop_path_rate,
                               attention_implementation=self.attention_implementation,
                               name=f"{layer}_attn", **common)(x, train)
    return x


class MaxViT(_Common):
  """MaxViT classifier; takes float32 NHWC images, returns [batch, num_classes] logits.

  `window_size=None` uses image_size // 32 for both the block window and the
  grid (7 at 224, 12 at 384, 16 at 512).  `drop_path_rate` is the rate of the
  last block; block b of N drops with rate * b / N (official schedule, block 0
  never drops).  `block_order` reorders the three layers of every block (paper
  Table 8).  `bn_axis_name` makes BatchNorm average its statistics over that
  named axis (under `shard_map`/`pmap`); under `jit` with a sharded batch the
  statistics are global already.
  """
  num_classes: int = 1000
  image_size: int | tuple[int, int] = 224
  depths: tuple[int, ...] = (2, 2, 5, 2)
  embed_dims: tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int | tuple[int, int] = 64
  head_dim: int = 32
  head_hidden_size: Optional[int] = -1   # -1: the last stage's width; None: no tanh pre-logits layer
  window_size: Optional[int | tuple[int, int]] = None
  expand_ratio: int = 4
  se_ratio: float = 0.25
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  attention_implementation: str = "xla"
  remat: bool = False
  block_order: tuple[str, ...] = BLOCK_LAYERS

  def __post_init__(self):
    self.check_config()  # bad options fail in get_model, before any tracing
    super().__post_init__()

  def windows(self) -> tuple[int, int]:
    """The (height, width) window (= grid) size for `image_size`."""
    return check_image_size(self.image_size, self.window_size, len(self.depths), self.block_order)

  def check_config(self) -> None:
    """Raises ValueError naming the option to fix (also an image size the windows do not fit)."""
    if sorted(self.block_order) != sorted(BLOCK_LAYERS):
      raise ValueError(f"block_order must be an ordering of {BLOCK_LAYERS} (paper Table 8), "
                       f"got {tuple(self.block_order)}.")
    if len(self.depths) != len(self.embed_dims):
      raise ValueError(f"depths {self.depths} and embed_dims {self.embed_dims} must have the same length.")
    layers.check_attention_implementation(self.attention_implementation)
    self.windows()

  def position_embeddings(self) -> dict[str, tuple[tuple[int, int], int]]:
    """No absolute position embeddings (the relative-bias tables are resized by the key name)."""
    return {}

  def attention_layout(self, path: str) -> Optional[registry.AttentionLayout]:
    """Token geometry of the attention layer at module `path` (vit_jax.analysis); None if unknown.

    `block_{stage}_{j}/block_attn` attends within windows of neighbouring positions,
    `block_{stage}_{j}/grid_attn` within windows of positions spread over the whole feature map.
    """
    match = re.fullmatch(r"block_(\d+)_(\d+)/(block|grid)_attn", path)
    if match is None:
      return None
    stage, j, kind = int(match[1]), int(match[2]), match[3]
    window = self.windows()
    # A stage's first MBConv halves the map; attention placed before it sees the previous size.
    before_mbconv = j == 0 and self.block_order.index(kind) < self.block_order.index("mbconv")
    image_hw = layers.to_2tuple(self.image_size)
    feature = tuple(stage_sizes(n, len(self.depths))[stage + (0 if before_mbconv else 1)] for n in image_hw)
    stride = tuple(n / f for n, f in zip(image_hw, feature))
    if kind == "grid":  # neighbouring keys of a grid window are feature / window positions apart
      stride = tuple(s * f / w for s, f, w in zip(stride, feature, window))
    attentions = [layer for layer in self.block_order if layer != "mbconv"]
    depth = 2 * (sum(self.depths[:stage]) + j) + attentions.index(kind)
    return registry.AttentionLayout(depth, kind, window, stride, 0, feature_size=feature)

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"MaxViT expects NHWC images [batch, height, width, 3], got shape {images.shape}.")
    window = self.windows()
    # The input may differ from image_size as long as its stages fit the same window.
    check_image_size(images.shape[1:3], window, len(self.depths), self.block_order)

    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu,
                  bn_axis_name=self.bn_axis_name, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, ln_epsilon=self.ln_epsilon)
    stem = layers.to_2tuple(self.stem_width)
    x = images.astype(self.dtype)
    x = self.conv(stem[0], 3, "stem_conv1", (None, None, CONV_IN, EMBED), strides=2)(x)
    x = self.gelu(self.batch_norm(train, "stem_norm")(x))
    # No norm/activation after the second stem conv: the first MBConv pre-norms.
    x = self.conv(stem[1], 3, "stem_conv2", (None, None, CONV_IN, EMBED))(x)

    block_cls = nn.remat(MaxViTBlock, static_argnums=(2,)) if self.remat else MaxViTBlock
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    index = 0
    for stage, (depth, width) in enumerate(zip(self.depths, self.embed_dims)):
      for j in range(depth):
        x = block_cls(features=width, strides=2 if j == 0 else 1, window=window, head_dim=self.head_dim,
                      expand_ratio=self.expand_ratio, se_ratio=self.se_ratio, mlp_ratio=self.mlp_ratio,
                      dropout_rate=self.dropout_rate, drop_path_rate=rates[index],
                      attention_implementation=self.attention_implementation,
                      block_order=tuple(self.block_order), name=f"block_{stage}_{j}", **common)(x, train)
        index += 1

    x = jnp.mean(x, axis=(1, 2))
    x = self.layer_norm("head_norm")(x)
    if self.head_hidden_size is not None:
      hidden = self.embed_dims[-1] if self.head_hidden_size == -1 else self.head_hidden_size
      x = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=logical(_KERNEL_INIT, (EMBED, MLP)), bias_init=logical(_ZEROS, (MLP,)),
                   name="pre_logits")(x)
      x = jnp.tanh(x)
    self.sow("intermediates", registry.FEATURES, x)  # the pre-logit features (registry.features)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(_KERNEL_INIT, (MLP, CLASSES)), bias_init=logical(_ZEROS, (CLASSES,)),
                 name="head")(x)
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- variants

# hp/vision.py of the official code; drop_path_rate = its ImageNet-1k stochastic depth.
MODEL_CONFIGS = {
    "MaxViT-T": dict(depths=(2, 2, 5, 2), embed_dims=(64, 128, 256, 512), stem_width=64, drop_path_rate=0.2),
    "MaxViT-S": dict(depths=(2, 2, 5, 2), embed_dims=(96, 192, 384, 768), stem_width=64, drop_path_rate=0.3),
    "MaxViT-B": dict(depths=(2, 6, 14, 2), embed_dims=(96, 192, 384, 768), stem_width=64, drop_path_rate=0.4),
    "MaxViT-L": dict(depths=(2, 6, 14, 2), embed_dims=(128, 256, 512, 1024), stem_width=128,
                     drop_path_rate=0.6),
    "MaxViT-XL": dict(depths=(2, 6, 14, 2), embed_dims=(192, 384, 768, 1536), stem_width=192,
                      drop_path_rate=0.6),
}

TIMM_NAMES = {"MaxViT-T": "maxvit_tiny_tf_224", "MaxViT-S": "maxvit_small_tf_224",
              "MaxViT-B": "maxvit_base_tf_224", "MaxViT-L": "maxvit_large_tf_224",
              "MaxViT-XL": "maxvit_xlarge_tf_384"}


def _layer_id(path: str, model: MaxViT) -> int:
  """Depth order of layer-wise lr decay, as timm's MaxxVit.group_matcher (one place per stage): the stem 0,
  every block of stage s s + 1, the head (norm, pre-logits, classifier) len(depths) + 1."""
  top = path.split("/")[0]
  if top.startswith("stem_"):
    return 0
  match = re.fullmatch(r"block_(\d+)_\d+", top)
  return int(match[1]) + 1 if match else len(model.depths) + 1


registry.register_family(registry.Family(
    name="maxvit", module=MaxViT, variants=MODEL_CONFIGS,
    converters=("vit_jax.weights.timm.maxvit", "vit_jax.weights.tf_maxvit"),
    timm_names=TIMM_NAMES,
    timm_kwargs=registry.regularisation_only({"drop_rate": "dropout_rate", "drop_path_rate": "drop_path_rate"}),
    head=("head",), posemb_resize="bilinear",
    layer_id=_layer_id, num_layers=lambda model: len(model.depths) + 2))
