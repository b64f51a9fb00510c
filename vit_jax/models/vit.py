"""Vision Transformer (ViT) and hybrid ResNet+ViT, as google-research/vision_transformer.

Module and parameter names equal the official linen model (`models_vit.py`,
`models_resnet.py`) so released checkpoints map one to one:

  [conv_root, gn_root, block{s}/unit{u}/...]   hybrid ResNet-v2 root (GroupNorm + weight-standardised convs)
  embedding                                    patch embedding (a strided conv)
  cls                                          class token (classifier='token')
  Transformer/posembed_input/pos_embedding     learned position embedding, cls row first
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}
  Transformer/encoder_norm
  MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
                                               attention-pooling head (classifier='map', big_vision)
  pre_logits                                   optional representation layer (Dense + tanh)
  head                                         (none with num_classes=0: the model returns the pooled features)

With `scan=True` the blocks are one `nn.scan` over depth: a single
`Transformer/encoderblock` subtree whose parameters carry a leading depth axis
(logical axis 'layers').  The weight converters translate between the two
layouts, so any checkpoint loads into either.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, registry
from vit_jax.models.layers import CLASSES, CONV_IN, EMBED, LAYERS, logical

Dtype = Any

CLASSIFIERS = ("token", "gap", "map")
POSEMBS = ("learn", "sincos2d")


# ----------------------------------------------------------------------------- hybrid ResNet root

class StdConv(nn.Conv):
  """Conv with weight standardisation, exactly as the official ViT hybrid.

  The kernel is standardised over (h, w, in) per output channel as
  `(w - mean) / (std + 1e-5)` (timm's port uses `sqrt(var + 1e-8)`: both agree
  to ~1e-5 / std relative).
  """

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == "kernel":
      kernel = jnp.asarray(param, jnp.float32)
      kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
      kernel = kernel / (jnp.std(kernel, axis=(0, 1, 2), keepdims=True) + 1e-5)
      param = kernel.astype(param.dtype)
    return param


def _std_conv(features, kernel_size, strides, name, dtype, param_dtype):
  return StdConv(features, kernel_size, strides=strides, padding="SAME", use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=logical(nn.initializers.lecun_normal(), (None, None, CONV_IN, None)))


def _group_norm(name, dtype, param_dtype, scale_init=nn.initializers.ones):
  # flax defaults as the official code: 32 groups, epsilon 1e-6 (timm's port: 1e-5).
  return nn.GroupNorm(num_groups=32, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=logical(scale_init, (None,)),
                      bias_init=logical(nn.initializers.zeros, (None,)))


class ResidualUnit(nn.Module):
  """Bottleneck unit of ResNet-v2 as in the ViT hybrids (post-activation, GroupNorm, StdConv)."""
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_std_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(_group_norm, dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, "conv_proj")(residual)
      residual = norm("gn_proj")(residual)
    y = nn.relu(norm("gn1")(conv(self.features, (1, 1), (1, 1), "conv1")(x)))
    y = nn.relu(norm("gn2")(conv(self.features, (3, 3), self.strides, "conv2")(y)))
    # Zero-initialised last norm: every unit starts as the identity (official init).
    y = norm("gn3", scale_init=nn.initializers.zeros)(conv(self.features * 4, (1, 1), (1, 1), "conv3")(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units named unit1..unitN; only the first one strides."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      x = ResidualUnit(self.features, strides=self.first_stride if i == 0 else (1, 1), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"unit{i + 1}")(x)
    return x


def resnet_stride(resnet) -> int:
  """Downsampling of the hybrid root: 4 (stem) times 2 per stage after the first."""
  if resnet is None:
    return 1
  num_layers, _ = resnet
  return 4 * 2 ** max(len(num_layers) - 1, 0)


def check_resnet(resnet) -> tuple[tuple[int, ...], float]:
  try:
    num_layers, width_factor = resnet
    num_layers = tuple(int(n) for n in num_layers)
    width_factor = float(width_factor)
  except (TypeError, ValueError):
    raise ValueError(f"resnet must be None or (stage_depths, width_factor), e.g. ((3, 4, 9), 1); got {resnet!r}.")
  if int(64 * width_factor) % 32:
    raise ValueError(f"resnet width 64*width_factor={64 * width_factor} must be a multiple of 32 "
                     "(GroupNorm uses 32 groups).")
  return num_layers, width_factor


# ----------------------------------------------------------------------------- transformer

def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embedding of big_vision / MoCo-v3, shape [1, h*w, width]."""
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs hidden_size divisible by 4, got {width}.")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature ** omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def _layer_norm(name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=logical(nn.initializers.ones, (EMBED,)),
                      bias_init=logical(nn.initializers.zeros, (EMBED,)))


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block.  Returns (x, None) so that it can be the body of `nn.scan`."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  use_drop_path: bool = False
  approximate_gelu: bool = True
  attention_implementation: str = "xla"
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop_path(self, x, rate, name):
    if not self.use_drop_path:  # `rate` is traced under nn.scan: decide by the model's rate
      return x
    return layers.DropPath(name=name)(x, deterministic=self.deterministic, rate=rate)

  @nn.compact
  def __call__(self, inputs, drop_path_rate=0.0):
    inputs = layers.constrain_batch(inputs)  # the residual stream: batch-split, weights all-gathered (FSDP)
    x = _layer_norm("LayerNorm_0", self.dtype, self.param_dtype)(inputs)
    x = layers.Attention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        implementation=self.attention_implementation, dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")(x, deterministic=self.deterministic)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)
    x = inputs + self._drop_path(x, drop_path_rate, "DropPath_0")
    y = _layer_norm("LayerNorm_1", self.dtype, self.param_dtype)(x)
    y = layers.MlpBlock(
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, approximate_gelu=self.approximate_gelu,
        dtype=self.dtype, param_dtype=self.param_dtype, name="MlpBlock_0")(y, deterministic=self.deterministic)
    return layers.constrain_batch(x + self._drop_path(y, drop_path_rate, "DropPath_1")), None


def remat_policy_fn(name: str):
  """The `jax.checkpoint_policies` entry called `name` (a clear error for a wrong name)."""
  # Entries named save_* / offload_* are policy factories (they need names/offload targets), not policies.
  valid = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith(("_", "save_", "offload_")))
  if name not in valid:
    raise ValueError(f"remat_policy {name!r} is not a jax.checkpoint_policies entry; valid: {', '.join(valid)}.")
  return getattr(jax.checkpoint_policies, name)


class AddPositionEmbs(nn.Module):
  """Learned position embedding of shape [1, tokens, width] (cls row first), added to the input."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", logical(nn.initializers.normal(stddev=0.02), (None, None, EMBED)),
                     (1,) + x.shape[1:], self.param_dtype)
    return x + jnp.asarray(pos, x.dtype)


class Encoder(nn.Module):
  """Position embedding, dropout, `depth` blocks and the final LayerNorm (module name `Transformer`)."""
  depth: int
  mlp_dim: int
  num_heads: int
  posemb: str = "learn"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  approximate_gelu: bool = True
  attention_implementation: str = "xla"
  scan: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.posemb == "learn":
      x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    block = Encoder1DBlock
    if self.remat:
      # Under scan, CSE across iterations is impossible anyway; prevent_cse=False lets XLA optimise more.
      block = nn.remat(block, policy=remat_policy_fn(self.remat_policy), prevent_cse=not self.scan)
    block_args = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, use_drop_path=self.drop_path_rate > 0,
        approximate_gelu=self.approximate_gelu, attention_implementation=self.attention_implementation,
        deterministic=not train, dtype=self.dtype, param_dtype=self.param_dtype)
    # Stochastic depth grows linearly with depth, 0 for the first block (as timm / big_vision).
    rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
    if self.scan:
      # Sown values (vit_jax.analysis) come out stacked over depth like the parameters.
      stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0, layers.ATTENTION_WEIGHTS: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=0, length=self.depth, metadata_params={nn.PARTITION_NAME: LAYERS})
      x, _ = stack(name="encoderblock", **block_args)(x, jnp.asarray(rates))
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", **block_args)(x, float(rates[i]))
    return _layer_norm("encoder_norm", self.dtype, self.param_dtype)(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling, as big_vision's `MAPHead` (same parameter names, so its checkpoints load).

  A learned probe [1, 1, D] attends over the tokens (`MultiHeadDotProductAttention_0`, probe as the
  query), then `LayerNorm_0` and `MlpBlock_0` with a residual; returns the probe's output [n, D].
  """
  num_heads: int
  mlp_dim: int
  approximate_gelu: bool = True
  attention_implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, EMBED)), (1, 1, d),
                       self.param_dtype)
    probe = jnp.tile(jnp.asarray(probe, x.dtype), (n, 1, 1))
    x = layers.Attention(num_heads=self.num_heads, implementation=self.attention_implementation, dtype=self.dtype,
                         param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
                         name="MultiHeadDotProductAttention_0")(probe, x)
    y = _layer_norm("LayerNorm_0", self.dtype, self.param_dtype)(x)
    x = x + layers.MlpBlock(mlp_dim=self.mlp_dim, approximate_gelu=self.approximate_gelu, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="MlpBlock_0")(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT / hybrid ResNet+ViT.  `__call__(images [n, h, w, 3] float32, train) -> logits [n, num_classes]`."""
  num_classes: int = 1000
  image_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  hidden_size: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  classifier: str = "token"               # 'token' (cls token), 'gap' (mean of the tokens) or 'map' (MAPHead)
  representation_size: Optional[int] = None  # pre-logits Dense + tanh
  posemb: str = "learn"                   # 'learn' or 'sincos2d' (fixed, big_vision)
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  approximate_gelu: bool = True           # tanh GELU as the official code; timm uses the exact one
  attention_implementation: str = "xla"   # 'xla' or 'cudnn' (jax.nn.dot_product_attention)
  dtype: Dtype = jnp.float32              # compute dtype, e.g. jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  scan: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  resnet: Optional[tuple[Sequence[int], float]] = None  # hybrid root: (stage depths, width factor)
  head_bias_init: float = 0.0

  def __post_init__(self):
    self.check_config()  # bad options fail in get_model, before any tracing
    super().__post_init__()

  def check_config(self) -> None:
    """Raises ValueError naming the option to fix (also an image size the patch grid does not divide)."""
    if self.num_classes < 0:
      raise ValueError(f"num_classes must be >= 0 (0: no head, the model returns features), got {self.num_classes}.")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}.")
    layers.check_attention_implementation(self.attention_implementation)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
    if self.resnet is not None:
      check_resnet(self.resnet)
    if self.remat:
      remat_policy_fn(self.remat_policy)
    self.grid_size  # noqa: B018  (raises when the patch grid does not divide image_size)

  @property
  def total_stride(self) -> tuple[int, int]:
    ph, pw = layers.to_2tuple(self.patch_size)
    s = resnet_stride(None if self.resnet is None else check_resnet(self.resnet))
    return ph * s, pw * s

  @property
  def grid_size(self) -> tuple[int, int]:
    """Patch grid (rows, columns) at `image_size`; raises when the size does not divide."""
    what = "patch size" if self.resnet is None else "total stride (ResNet root x patch size)"
    return layers.check_divisible(self.image_size, self.total_stride, what)

  def position_embeddings(self) -> dict[str, tuple[tuple[int, int], int]]:
    """Parameter name -> (patch grid, prefix tokens) of each learned position embedding."""
    if self.posemb != "learn":
      return {}
    return {"Transformer/posembed_input/pos_embedding": (self.grid_size, int(self.classifier == "token"))}

  def attention_layout(self, path: str) -> registry.AttentionLayout | None:
    """Token geometry of the attention layer at module `path` (vit_jax.analysis); None if unknown."""
    prefix = int(self.classifier == "token")
    if path == "MAPHead_0":  # the probe attends over all tokens, after the last block
      return registry.AttentionLayout(self.depth, "cross", self.grid_size, self.total_stride, prefix)
    block = path.removeprefix("Transformer/encoderblock_")
    if not block.isdigit():
      return None
    return registry.AttentionLayout(int(block), "self", self.grid_size, self.total_stride, prefix)

  @nn.compact
  def __call__(self, images, train: bool = False):
    grid = self.grid_size
    layers.check_images(images, self.image_size, type(self).__name__)
    x = jnp.asarray(images, self.dtype)

    if self.resnet is not None:
      num_layers, width_factor = check_resnet(self.resnet)
      width = int(64 * width_factor)
      x = _std_conv(width, (7, 7), (2, 2), "conv_root", self.dtype, self.param_dtype)(x)
      x = nn.relu(_group_norm("gn_root", self.dtype, self.param_dtype)(x))
      x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
      for stage, units in enumerate(num_layers):
        x = ResNetStage(units, width * 2 ** stage, first_stride=(1, 1) if stage == 0 else (2, 2),
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"block{stage + 1}")(x)

    x = nn.Conv(self.hidden_size, layers.to_2tuple(self.patch_size), strides=layers.to_2tuple(self.patch_size),
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype, name="embedding",
                kernel_init=logical(nn.initializers.lecun_normal(), (None, None, CONV_IN, EMBED)),
                bias_init=logical(nn.initializers.zeros, (EMBED,)))(x)
    n, h, w, c = x.shape
    assert (h, w) == grid, ((h, w), grid)
    x = x.reshape(n, h * w, c)
    if self.posemb == "sincos2d":
      # Fixed table on the grid only; the cls token gets none (big_vision).
      x = x + jnp.asarray(posemb_sincos_2d(h, w, c), x.dtype)
    if self.classifier == "token":
      cls = self.param("cls", logical(nn.initializers.zeros, (None, None, EMBED)), (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(jnp.asarray(cls, x.dtype), (n, 1, 1)), x], axis=1)

    x = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, posemb=self.posemb,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, approximate_gelu=self.approximate_gelu,
        attention_implementation=self.attention_implementation, scan=self.scan, remat=self.remat,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="Transformer")(x, train=train)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, approximate_gelu=self.approximate_gelu,
                  attention_implementation=self.attention_implementation, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="MAPHead_0")(x)
    else:
      x = jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_logits",
                   kernel_init=logical(nn.initializers.lecun_normal(), (EMBED, None)),
                   bias_init=logical(nn.initializers.zeros, (None,)))(x)
      x = jnp.tanh(x)
    self.sow("intermediates", registry.FEATURES, x)  # the pre-logit features (registry.features)
    if not self.num_classes:  # no head: the pooled (pre-logits) features
      return x.astype(jnp.float32)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                 kernel_init=logical(nn.initializers.zeros, (EMBED if self.representation_size is None else None,
                                                             CLASSES)),
                 bias_init=logical(nn.initializers.constant(self.head_bias_init), (CLASSES,)))(x)
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- registry

def _variant(patch, hidden, mlp_dim, heads, depth, dropout=0.0, resnet=None, **options):
  return dict(image_size=224, patch_size=patch, hidden_size=hidden, mlp_dim=mlp_dim, num_heads=heads,
              depth=depth, dropout_rate=dropout, resnet=resnet, **options)


# Values as the official configs/models.py.
VARIANTS = {
    "ViT-Ti_16": _variant(16, 192, 768, 3, 12),
    "ViT-S_16": _variant(16, 384, 1536, 6, 12),
    "ViT-S_32": _variant(32, 384, 1536, 6, 12),
    "ViT-B_8": _variant(8, 768, 3072, 12, 12),
    "ViT-B_16": _variant(16, 768, 3072, 12, 12),
    "ViT-B_32": _variant(32, 768, 3072, 12, 12),
    "ViT-L_16": _variant(16, 1024, 4096, 16, 24, 0.1),
    "ViT-L_32": _variant(32, 1024, 4096, 16, 24),
    "ViT-H_14": _variant(14, 1280, 5120, 16, 32, 0.1),
    # Zhai et al., "Scaling Vision Transformers" (big_vision 'g/14', 'G/14'): MAP head, no class token.
    "ViT-g_14": _variant(14, 1408, 6144, 16, 40, classifier="map"),
    "ViT-G_14": _variant(14, 1664, 8192, 16, 48, classifier="map"),
    "R+ViT-Ti_16": _variant(8, 192, 768, 3, 12, resnet=((), 1)),
    "R26+ViT-S_32": _variant(1, 384, 1536, 6, 12, resnet=((2, 2, 2, 2), 1)),
    "R26+ViT-B_32": _variant(1, 768, 3072, 12, 12, resnet=((2, 2, 2, 2), 1)),
    "R50+ViT-B_16": _variant(1, 768, 3072, 12, 12, 0.1, resnet=((3, 4, 9), 1)),
    "R50+ViT-L_32": _variant(1, 1024, 4096, 16, 24, 0.1, resnet=((3, 4, 6, 3), 1)),
}

TIMM_NAMES = {
    "ViT-Ti_16": "vit_tiny_patch16_224", "ViT-S_16": "vit_small_patch16_224",
    "ViT-S_32": "vit_small_patch32_224", "ViT-B_8": "vit_base_patch8_224",
    "ViT-B_16": "vit_base_patch16_224", "ViT-B_32": "vit_base_patch32_224",
    "ViT-L_16": "vit_large_patch16_224", "ViT-L_32": "vit_large_patch32_224",
    "ViT-H_14": "vit_huge_patch14_224", "R+ViT-Ti_16": "vit_tiny_r_s16_p8_224",
    "R26+ViT-S_32": "vit_small_r26_s32_224", "R50+ViT-B_16": "vit_base_r50_s16_224",
    "R50+ViT-L_32": "vit_large_r50_s32_224",
}


_TIMM_RATES = {"drop_path_rate": "drop_path_rate", "proj_drop_rate": "dropout_rate",
               "pos_drop_rate": "dropout_rate", "attn_drop_rate": "attention_dropout_rate"}


def _timm_kwargs(model: VisionTransformer, overridden: set[str]) -> dict[str, Any]:
  """timm's VisionTransformer takes the whole architecture, so overridden (e.g. tiny) plain models match."""
  if model.resnet is not None:
    return registry.regularisation_only(_TIMM_RATES)(model, overridden)
  h, w = layers.to_2tuple(model.image_size)
  kwargs = dict(img_size=h if h == w else (h, w), patch_size=model.patch_size, embed_dim=model.hidden_size,
                depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_dim / model.hidden_size)
  if model.classifier == "map":
    raise ValueError("timm's attention pooling ('map') has other parameter names; classifier='map' cannot be "
                     "matched there.")
  if model.classifier == "gap":
    kwargs.update(class_token=False, global_pool="avg")
  rates = registry.regularisation_only(_TIMM_RATES)(model, set())
  return dict(kwargs, **rates)


def _layer_id(path: str, model: VisionTransformer) -> int | tuple[int, ...]:
  """Depth order of layer-wise lr decay, as timm's VisionTransformer.group_matcher and BEiT: the embeddings
  (patch embedding, hybrid ResNet root, class token, position embedding) 0, encoderblock_i i + 1 (a scanned
  stack: 1..depth along its leading axis), everything after the blocks (final norm, MAP head, pre-logits,
  head) depth + 1."""
  parts = path.split("/")
  if parts[0] in ("embedding", "cls", "conv_root", "gn_root", "pos_embedding") or \
      (parts[0].startswith("block") and parts[0][5:].isdigit()) or parts[:2] == ["Transformer", "posembed_input"]:
    return 0
  if len(parts) > 1 and parts[0] == "Transformer" and parts[1].startswith("encoderblock"):
    index = parts[1].removeprefix("encoderblock").lstrip("_")
    return int(index) + 1 if index else tuple(range(1, model.depth + 1))
  return model.depth + 1


registry.register_family(registry.Family(
    name="vit", module=VisionTransformer, variants=VARIANTS, timm_kwargs=_timm_kwargs,
    converters=("vit_jax.weights.official_npz", "vit_jax.weights.timm.vit", "vit_jax.weights.transformers.vit"),
    timm_names=TIMM_NAMES, head=("head",), posemb_resize="bilinear",
    layer_id=_layer_id, num_layers=lambda model: model.depth + 2, patch_kernels=("embedding/kernel",)))
