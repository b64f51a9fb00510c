"""CrossViT (Chen, Fan & Panda, ICCV 2021, arXiv 2103.14899) in Flax linen.

Numerically equal to the official IBM code and timm's `crossvit_*` models:

  * Two branches: branch 0 = S-branch (patch 12, narrow), branch 1 = L-branch
    (patch 16, wide).  Branch 1 sees the input resized inside the model with
    PyTorch's bicubic kernel (240 -> 224 for the released models, 408 -> 384
    for the 384-fine-tuned ones).
  * K multi-scale blocks: N S-branch and M L-branch pre-norm transformer blocks,
    then fusion.  The default fusion is cross-attention with each branch's CLS
    token (projected by f = LayerNorm -> GELU -> Dense) as the only query over
    [CLS || other branch's patch tokens], no MLP after it, and back-projection
    g = LayerNorm -> GELU -> Dense.
  * Logits = mean of the two heads applied to the normed CLS tokens.

Fusion ablations of the paper (Table 6, section 3.3) are available through
`fusion=`: "cross_attention" (default, the released models), "all_attention",
"class_token", "pairwise" and "none".  For the three heuristic fusions the
common space of the sums/attention is the L-branch width: f^L and g^L are the
identity and f^S, g^S are LayerNorm -> GELU -> Dense (this reproduces the
paper's 24.2M parameters for class-token and pairwise fusion on CrossViT-S).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, registry
from vit_jax.models.layers import CLASSES, CONV_IN, EMBED, logical

Dtype = Any
FUSIONS = ("cross_attention", "all_attention", "class_token", "pairwise", "none")
LAYER_NORM_EPS = 1e-6   # timm/IBM use LayerNorm(eps=1e-6) everywhere in CrossViT.
# The released models run the L-branch at 224/240 of the input (240 -> 224);
# the 384 fine-tunes run 408 -> 384, i.e. the nearest multiple of the L patch.
LARGE_BRANCH_SCALE = 224 / 240

# timm initialisation: Linear trunc_normal(.02) with zero bias, LayerNorm 1/0,
# position embeddings and CLS tokens trunc_normal(.02); convolutions keep
# PyTorch's default (kaiming_uniform(a=sqrt(5)) = uniform variance 1/(3 fan_in)).
DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)
TOKEN_INIT = nn.initializers.truncated_normal(stddev=0.02)
CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def large_branch_size(image_size, patch_size: int = 16) -> tuple[int, int]:
  """The L-branch input size the released models use for `image_size` (240->224, 408->384)."""
  return tuple(max(patch_size, int(round(s * LARGE_BRANCH_SCALE / patch_size)) * patch_size)
               for s in layers.to_2tuple(image_size))


def bicubic_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC resize equal to `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`.

  PyTorch uses the Keys kernel with a=-0.75, half-pixel centres, clamped
  borders and no antialiasing even when downsampling; `cubic-pytorch` without
  antialias is exactly that (plain 'bicubic' in JAX is a=-0.5 with antialias).
  """
  b, h, w, c = images.shape
  if (h, w) == tuple(size):
    return images
  scale = jnp.array([size[0] / h, size[1] / w], jnp.float32)
  return jax.image.scale_and_translate(
      images, (b, size[0], size[1], c), (1, 2), scale, jnp.zeros(2, jnp.float32),
      method="cubic-pytorch", antialias=False).astype(images.dtype)


def _layer_norm(dtype, param_dtype, name=None):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                      scale_init=logical(nn.initializers.ones, (EMBED,)),
                      bias_init=logical(nn.initializers.zeros, (EMBED,)), name=name)


def _dense(features, dtype, param_dtype, names=(EMBED, None), name=None):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=logical(DENSE_INIT, names),
                  bias_init=logical(nn.initializers.zeros, (names[1],)), name=name)


class PatchEmbed(nn.Module):
  """Linear patch embedding (one strided conv) or the dagger 3-conv tokenizer."""
  patch_size: int
  embed_dim: int
  multi_conv: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    def conv(features, kernel, stride, padding, out_axis, name):
      return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical(CONV_INIT, (None, None, CONV_IN, out_axis)),
                     bias_init=logical(nn.initializers.zeros, (out_axis,)), name=name)

    d, p = self.embed_dim, self.patch_size
    if not self.multi_conv:
      x = conv(d, p, p, "VALID", EMBED, "conv_0")(x)
    else:
      if p not in (12, 16) or d % 4:
        raise ValueError(f"the 3-conv (dagger) patch embedding exists for patch sizes 12 and 16 "
                         f"with a width divisible by 4; got patch {p}, width {d}.")
      # (out, kernel, stride, padding) exactly as the official PatchEmbed(multi_conv=True).
      second = (3, 3, 0) if p == 12 else (3, 2, 1)
      third = (3, 1, 1) if p == 12 else (3, 2, 1)
      specs = [(d // 4, 7, 4, 3), (d // 2, *second), (d, *third)]
      for i, (features, k, s, pad) in enumerate(specs):
        x = conv(features, k, s, ((pad, pad), (pad, pad)), EMBED if i == 2 else None, f"conv_{i}")(x)
        if i < 2:
          x = nn.relu(x)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


class EncoderBlock(nn.Module):
  """timm `vision_transformer.Block`: x + attn(LN(x)), then x + mlp(LN(x)) (pre-norm, no LayerScale)."""
  num_heads: int
  mlp_ratio: float
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  qkv_bias: bool = True
  approximate_gelu: bool = False
  attention_implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    width = x.shape[-1]
    y = _layer_norm(self.dtype, self.param_dtype, "norm1")(x)
    y = layers.Attention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, use_bias=self.qkv_bias,
        implementation=self.attention_implementation, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=DENSE_INIT, name="attn")(y, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)
    y = _layer_norm(self.dtype, self.param_dtype, "norm2")(x)
    y = layers.MlpBlock(
        mlp_dim=int(width * self.mlp_ratio), dropout_rate=self.dropout_rate,
        approximate_gelu=self.approximate_gelu, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=DENSE_INIT, bias_init=nn.initializers.zeros, name="mlp")(y, deterministic=deterministic)
    return x + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class Projection(nn.Module):
  """f / g of the paper: LayerNorm -> GELU -> Dense (the official `projs` / `revert_projs`)."""
  features: int
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _layer_norm(self.dtype, self.param_dtype, "norm")(x)
    x = layers.gelu(self.approximate_gelu)(x)
    return _dense(self.features, self.dtype, self.param_dtype, name="dense")(x)


class CrossAttentionBlock(nn.Module):
  """cls + drop_path(CA(LN(x))): the first token is the only query; keys/values are all tokens."""
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  qkv_bias: bool = True
  attention_implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = _layer_norm(self.dtype, self.param_dtype, "norm")(x)
    y = layers.Attention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, use_bias=self.qkv_bias,
        implementation=self.attention_implementation, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=DENSE_INIT, name="attn")(y[:, :1], y, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return x[:, :1] + layers.DropPath(self.drop_path_rate)(y, deterministic=deterministic)


def _to_grid(tokens, hw):
  return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1])


def _resize_tokens(tokens, from_hw, to_hw):
  """Patch tokens [B, h*w, C] bilinearly resampled onto another grid (pairwise fusion)."""
  if tuple(from_hw) == tuple(to_hw):
    return tokens
  grid = _to_grid(tokens, from_hw)
  grid = jax.image.resize(grid, (grid.shape[0], *to_hw, grid.shape[-1]), "linear", antialias=False)
  return grid.reshape(grid.shape[0], to_hw[0] * to_hw[1], grid.shape[-1]).astype(tokens.dtype)


class MultiScaleBlock(nn.Module):
  """One multi-scale transformer encoder: N + M branch blocks, then fusion of the two branches."""
  embed_dims: tuple[int, int]
  num_heads: tuple[int, int]
  mlp_ratios: tuple[float, float]
  depths: tuple[int, int]            # (N, M)
  cross_depth: int                   # L: stacked cross-attention modules
  grids: tuple[tuple[int, int], tuple[int, int]]
  drop_path_rates: tuple[float, ...]
  fusion: str = "cross_attention"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  qkv_bias: bool = True
  approximate_gelu: bool = False
  attention_implementation: str = "xla"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs, deterministic: bool):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_common = dict(dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                       qkv_bias=self.qkv_bias, attention_implementation=self.attention_implementation,
                       **common)
    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    outs = []
    for i, x in enumerate(xs):
      for n in range(self.depths[i]):
        x = block_cls(num_heads=self.num_heads[i], mlp_ratio=self.mlp_ratios[i],
                      drop_path_rate=self.drop_path_rates[n], approximate_gelu=self.approximate_gelu,
                      name=f"branch_{i}_block_{n}", **attn_common)(x, deterministic)
      outs.append(x)
    fuse = getattr(self, f"_fuse_{self.fusion}")
    return fuse(outs, deterministic, common, attn_common)

  def _project(self, features, name, common):
    return Projection(features, approximate_gelu=self.approximate_gelu, name=name, **common)

  def _fuse_none(self, outs, deterministic, common, attn_common):
    return outs

  def _fuse_cross_attention(self, outs, deterministic, common, attn_common):
    fused = []
    for i in range(2):
      j = 1 - i
      # f_i: own CLS into the other branch's width, then [CLS || other branch's patch tokens].
      cls = self._project(self.embed_dims[j], f"proj_{i}", common)(outs[i][:, :1])
      t = jnp.concatenate([cls, outs[j][:, 1:]], axis=1)
      for l in range(self.cross_depth):
        # As in the official code, stacked modules form a Sequential, so module l > 0
        # only sees the CLS token that module l - 1 returned.
        t = CrossAttentionBlock(num_heads=self.num_heads[j], drop_path_rate=self.drop_path_rates[-1],
                                name=f"fusion_{i}_{l}", **attn_common)(t, deterministic)
      cls = self._project(self.embed_dims[i], f"revert_proj_{i}", common)(t[:, :1])
      fused.append(jnp.concatenate([cls, outs[i][:, 1:]], axis=1))
    return fused

  # The heuristic fusions share one space, the L-branch width (see module docstring):
  # f^S / g^S are created once per block and reused for every token they map.
  def _small_projections(self, common):
    return (self._project(self.embed_dims[1], "proj_0", common),
            self._project(self.embed_dims[0], "revert_proj_0", common))

  def _fuse_class_token(self, outs, deterministic, common, attn_common):
    # Eq. 3: z^i = [g^i(f^S(cls^S) + cls^L) || patches^i].
    f_small, g_small = self._small_projections(common)
    cls_sum = f_small(outs[0][:, :1]) + outs[1][:, :1]
    return [jnp.concatenate([g_small(cls_sum), outs[0][:, 1:]], axis=1),
            jnp.concatenate([cls_sum, outs[1][:, 1:]], axis=1)]

  def _fuse_pairwise(self, outs, deterministic, common, attn_common):
    # Eq. 4: CLS tokens as in class-token fusion; patch tokens summed position by
    # position after resampling the other branch's grid onto the own one.
    small, large = outs
    grid_small, grid_large = self.grids
    f_small, g_small = self._small_projections(common)
    cls_sum = f_small(small[:, :1]) + large[:, :1]
    patches_on_small = f_small(small[:, 1:]) + _resize_tokens(large[:, 1:], grid_large, grid_small)
    patches_on_large = f_small(_resize_tokens(small[:, 1:], grid_small, grid_large)) + large[:, 1:]
    return [g_small(jnp.concatenate([cls_sum, patches_on_small], axis=1)),
            jnp.concatenate([cls_sum, patches_on_large], axis=1)]

  def _fuse_all_attention(self, outs, deterministic, common, attn_common):
    # Eq. 2: y = [f^L(x^L) || f^S(x^S)], o = y + MSA(LN(y)), z^i = g^i(o^i).
    small, large = outs
    f_small, g_small = self._small_projections(common)
    y = jnp.concatenate([large, f_small(small)], axis=1)
    h = _layer_norm(self.dtype, self.param_dtype, "all_attention_norm")(y)
    h = layers.Attention(
        num_heads=self.num_heads[1], dropout_rate=self.attention_dropout_rate, use_bias=self.qkv_bias,
        implementation=self.attention_implementation, kernel_init=DENSE_INIT, name="all_attention",
        **common)(h, deterministic=deterministic)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    o = y + layers.DropPath(self.drop_path_rates[-1])(h, deterministic=deterministic)
    n_large = large.shape[1]
    return [g_small(o[:, n_large:]), o[:, :n_large]]


class CrossViT(nn.Module):
  """Dual-branch CrossViT classifier; `__call__(images NHWC, train)` -> logits [batch, num_classes]."""
  num_classes: int = 1000
  image_size: int | tuple[int, int] = 240
  # L-branch input size; None = the released rule (240 -> 224, 408 -> 384, see `large_branch_size`).
  large_image_size: Optional[int | tuple[int, int]] = None
  patch_sizes: tuple[int, int] = (12, 16)
  embed_dims: tuple[int, int] = (192, 384)
  num_heads: tuple[int, int] = (6, 6)
  mlp_ratios: tuple[float, float] = (4.0, 4.0)
  num_multiscale_blocks: int = 3     # K
  small_depth: int = 1               # N
  large_depth: int = 4               # M
  cross_depth: int = 1               # L
  multi_conv: bool = False           # dagger: 3-conv patch embedding
  fusion: str = "cross_attention"
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  approximate_gelu: bool = False
  attention_implementation: str = "xla"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # ------------------------------------------------------------------ geometry
  def branch_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """(height, width) of the image each branch sees."""
    small = layers.to_2tuple(self.image_size)
    large = (layers.to_2tuple(self.large_image_size) if self.large_image_size is not None
             else large_branch_size(small, self.patch_sizes[1]))
    return small, large

  def grids(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """Patch grid of each branch; a clear error when a patch size does not divide its input."""
    small, large = self.branch_sizes()
    try:
      grid_small = layers.check_divisible(small, self.patch_sizes[0], "S-branch patch size")
    except ValueError as e:
      raise ValueError(f"CrossViT: {e} (image_size must be a multiple of "
                       f"{self.patch_sizes[0]}, e.g. 240 or 408.)") from None
    try:
      grid_large = layers.check_divisible(large, self.patch_sizes[1], "L-branch patch size")
    except ValueError as e:
      raise ValueError(f"CrossViT: the L-branch input {large[0]}x{large[1]} does not fit: {e} "
                       "Pass large_image_size= a multiple of the L patch size.") from None
    return grid_small, grid_large

  def drop_path_schedule(self) -> list[list[float]]:
    """Per multi-scale block the rates of the official code: linspace over K*(M + L') blocks."""
    extra = 0 if self.cross_depth == 1 else self.cross_depth   # official depth[-1] (0 means one module)
    per_block = max(self.small_depth, self.large_depth) + extra
    total = self.num_multiscale_blocks * (self.large_depth + extra)
    rates = np.linspace(0.0, self.drop_path_rate, max(total, 1)).tolist()
    # The official pointer advances by max(N, M) + L' per block; when N > M it runs
    # past the end (the official code would fail there), so pad with the last rate.
    return [(rates[k * per_block:(k + 1) * per_block] + [rates[-1]] * per_block)[:per_block]
            for k in range(self.num_multiscale_blocks)]

  def __post_init__(self):
    self.check_config()  # bad options fail in get_model, before any tracing
    super().__post_init__()

  def check_config(self) -> None:
    """Raises ValueError naming the option to fix (also an image size a patch size does not divide)."""
    if self.fusion not in FUSIONS:
      raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}.")
    for name in ("patch_sizes", "embed_dims", "num_heads", "mlp_ratios"):
      if len(getattr(self, name)) != 2:
        raise ValueError(f"{name} needs one entry per branch (S, L), got {getattr(self, name)}.")
    for d, h in zip(self.embed_dims, self.num_heads):
      if d % h:
        raise ValueError(f"width {d} is not divisible by {h} heads; choose num_heads dividing embed_dims.")
    if self.fusion == "cross_attention" and self.cross_depth < 1:
      raise ValueError("cross_depth (L) must be >= 1 with cross-attention fusion.")
    layers.check_attention_implementation(self.attention_implementation)
    self.grids()

  def position_embeddings(self) -> dict[str, tuple[tuple[int, int], int]]:
    """Parameter name -> (patch grid, prefix tokens) of each learned position embedding."""
    return {f"pos_embed_{i}": (grid, 1) for i, grid in enumerate(self.grids())}

  def attention_layout(self, path: str) -> Optional[registry.AttentionLayout]:
    """Token geometry of the attention layer at module `path` (vit_jax.analysis); None if unknown.

    Branch self-attention: `multiscale_block_{k}/branch_{i}_block_{n}`; cross-attention of branch
    i's class token onto branch j's patches: `multiscale_block_{k}/fusion_{i}_{l}`.
    """
    match = re.fullmatch(r"multiscale_block_(\d+)/(?:branch_(\d)_block_(\d+)|fusion_(\d)_(\d+))", path)
    if match is None:
      return None
    k, branch, n, fused, l = (None if g is None else int(g) for g in match.groups())
    per_block = self.small_depth + self.large_depth + 2 * self.cross_depth
    # Pixels of the input image between patches: the L-branch patches cover more of it (240 -> 224).
    image_hw = layers.to_2tuple(self.image_size)
    patch_px = [tuple(self.patch_sizes[i] * s / b for s, b in zip(image_hw, size))
                for i, size in enumerate(self.branch_sizes())]
    if branch is not None:
      depth = k * per_block + n + (self.small_depth if branch == 1 else 0)
      return registry.AttentionLayout(depth, "self", self.grids()[branch], patch_px[branch], 1, branch=branch)
    keys = 1 - fused
    depth = k * per_block + self.small_depth + self.large_depth + fused * self.cross_depth + l
    return registry.AttentionLayout(depth, "cross", self.grids()[keys], patch_px[keys], 1, branch=keys)

  # ------------------------------------------------------------------ forward
  @nn.compact
  def __call__(self, images, train: bool = False):
    deterministic = not train
    grids = self.grids()
    sizes = self.branch_sizes()
    layers.check_images(images, sizes[0], "CrossViT")
    xs = []
    for i in range(2):
      # Resize in float32 (the kernel weights would lose precision in bfloat16).
      x = bicubic_resize(images.astype(jnp.float32), sizes[i]).astype(self.dtype)
      x = PatchEmbed(self.patch_sizes[i], self.embed_dims[i], self.multi_conv, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"patch_embed_{i}")(x)
      d = self.embed_dims[i]
      cls = self.param(f"cls_token_{i}", logical(TOKEN_INIT, (None, None, EMBED)), (1, 1, d),
                       self.param_dtype)
      pos = self.param(f"pos_embed_{i}", logical(TOKEN_INIT, (None, None, EMBED)),
                       (1, 1 + grids[i][0] * grids[i][1], d), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1)
      x = x + pos.astype(x.dtype)
      xs.append(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))

    for k, rates in enumerate(self.drop_path_schedule()):
      xs = MultiScaleBlock(
          embed_dims=tuple(self.embed_dims), num_heads=tuple(self.num_heads),
          mlp_ratios=tuple(self.mlp_ratios), depths=(self.small_depth, self.large_depth),
          cross_depth=self.cross_depth, grids=grids, drop_path_rates=tuple(rates), fusion=self.fusion,
          dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
          qkv_bias=self.qkv_bias, approximate_gelu=self.approximate_gelu,
          attention_implementation=self.attention_implementation, remat=self.remat,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"multiscale_block_{k}")(xs, deterministic)

    logits, class_tokens = [], []
    for i, x in enumerate(xs):
      cls = _layer_norm(self.dtype, self.param_dtype, f"norm_{i}")(x[:, 0])
      class_tokens.append(cls)
      logits.append(_dense(self.num_classes, self.dtype, self.param_dtype, (EMBED, CLASSES),
                           name=f"head_{i}")(cls).astype(jnp.float32))
    self.sow("intermediates", registry.FEATURES, jnp.concatenate(class_tokens, axis=-1))
    return (logits[0] + logits[1]) / 2.0


# ---------------------------------------------------------------------- variants
# Paper Table 1 (K=3, N=1, L=1; heads equal in both branches) = timm crossvit_*.
def _variant(dims, heads, m, r, dagger=False):
  return dict(embed_dims=dims, num_heads=(heads, heads), large_depth=m, mlp_ratios=(float(r), float(r)),
              multi_conv=dagger)


VARIANTS = {
    "CrossViT-Ti": _variant((96, 192), 3, 4, 4),
    "CrossViT-S": _variant((192, 384), 6, 4, 4),
    "CrossViT-B": _variant((384, 768), 12, 4, 4),
    "CrossViT-9": _variant((128, 256), 4, 3, 3),
    "CrossViT-15": _variant((192, 384), 6, 5, 3),
    "CrossViT-18": _variant((224, 448), 7, 6, 3),
    "CrossViT-9-dagger": _variant((128, 256), 4, 3, 3, dagger=True),
    "CrossViT-15-dagger": _variant((192, 384), 6, 5, 3, dagger=True),
    "CrossViT-18-dagger": _variant((224, 448), 7, 6, 3, dagger=True),
}

# timm names the released models by their input size (IBM's `*_224` = timm's `*_240`).
TIMM_NAMES = {
    "CrossViT-Ti": "crossvit_tiny_240", "CrossViT-S": "crossvit_small_240", "CrossViT-B": "crossvit_base_240",
    "CrossViT-9": "crossvit_9_240", "CrossViT-15": "crossvit_15_240", "CrossViT-18": "crossvit_18_240",
    "CrossViT-9-dagger": "crossvit_9_dagger_240", "CrossViT-15-dagger": "crossvit_15_dagger_240",
    "CrossViT-18-dagger": "crossvit_18_dagger_240",
}


def _layer_id(path: str, model: CrossViT) -> int:
  """Depth order of layer-wise lr decay, as timm's CrossVit.group_matcher: both branches' patch embeddings,
  class tokens and position embeddings 0, multiscale_block_k k + 1 (its branch blocks and fusion together),
  the final norms and heads K + 1."""
  top = path.split("/")[0]
  if re.fullmatch(r"(patch_embed|cls_token|pos_embed)_\d+", top):
    return 0
  match = re.fullmatch(r"multiscale_block_(\d+)", top)
  return int(match[1]) + 1 if match else model.num_multiscale_blocks + 1


registry.register_family(registry.Family(
    name="crossvit", module=CrossViT, variants=VARIANTS,
    converters=("vit_jax.weights.timm.crossvit", "vit_jax.weights.ibm"),
    timm_names=TIMM_NAMES,
    timm_kwargs=registry.regularisation_only({"drop_rate": "dropout_rate", "attn_drop_rate": "attention_dropout_rate",
                                              "drop_path_rate": "drop_path_rate"}),
    head=("head_0", "head_1"), posemb_resize="bicubic",
    layer_id=_layer_id, num_layers=lambda model: model.num_multiscale_blocks + 2))
