"""Mixup / CutMix on a batch, as a pure JAX function for the train step (timm's batch mode).

Each example is mixed with the example at the mirrored batch position (batch reversed),
with one mixing weight `lam` for the whole batch; the soft labels get the same weights.
Under `jit` pass the alphas as Python floats (they choose the code path).
"""
import jax
import jax.numpy as jnp


def _cutmix_box_mask(rng, lam, height: int, width: int):
  """[h, w] bool mask of a random box covering about (1 - lam) of the image, and its exact share."""
  rng_y, rng_x = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  # The box was clipped at the border: the label weight follows the real pixel share.
  return box, 1.0 - box.mean()


def mix(rng, images, labels_onehot, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5):
  """Mixes `images` [b, h, w, c] and `labels_onehot` [b, k]; returns (images, soft_labels).

  With both alphas > 0, CutMix is used with probability `switch_prob`, else Mixup.
  Both alphas 0 returns the inputs unchanged.  Soft labels keep summing to 1.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}.")
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, labels_onehot
  rng_choice, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 4)
  height, width = images.shape[1], images.shape[2]
  partner_images, partner_labels = images[::-1], labels_onehot[::-1]

  def mixup():
    lam = jax.random.beta(rng_mixup, mixup_alpha, mixup_alpha)
    mixed = lam * images + (1.0 - lam) * partner_images
    return mixed.astype(images.dtype), lam

  def cutmix():
    lam = jax.random.beta(rng_cutmix, cutmix_alpha, cutmix_alpha)
    box, lam = _cutmix_box_mask(rng_box, lam, height, width)
    return jnp.where(box[None, :, :, None], partner_images, images), lam

  if cutmix_alpha == 0:
    mixed, lam = mixup()
  elif mixup_alpha == 0:
    mixed, lam = cutmix()
  else:
    use_cutmix = jax.random.uniform(rng_choice) < switch_prob
    mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup)
  lam = lam.astype(labels_onehot.dtype)
  return mixed, lam * labels_onehot + (1.0 - lam) * partner_labels
