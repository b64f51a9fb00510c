"""RandAugment (Cubuk et al. 2019) as stateless TF ops on uint8 images, e.g. randaugment=(2, 15).

Each of `num_layers` rounds picks one op uniformly and applies it with probability
0.5 (as timm) at strength `magnitude / 10` (levels as the EfficientNet/AugReg code:
10 = the paper's maximum, 15 goes beyond it).  Geometric ops and enhancements take
a random sign; the fill colour of geometric ops is grey (128).  Ops follow PIL
(autocontrast, equalize, posterize, solarize, color, contrast, brightness, sharpness).
"""
import math

import tensorflow as tf

OPS = ("identity", "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize",
       "solarize_add", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
       "translate_x", "translate_y")
_FILL = 128.0


def _blend(image, degenerate, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8."""
  image, degenerate = tf.cast(image, tf.float32), tf.cast(degenerate, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(degenerate + factor * (image - degenerate)), 0, 255), tf.uint8)


def _grey(image):
  return tf.image.rgb_to_grayscale(image)  # uint8 [h, w, 1], ITU-R 601 weights like PIL.


def autocontrast(image):
  """Stretches each channel to 0..255 (channels that are flat stay unchanged)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.cast(tf.clip_by_value(tf.round((x - offset) * scale), 0, 255), tf.uint8)


def _equalize_channel(channel):
  """PIL ImageOps.equalize for one uint8 [h, w] channel."""
  hist = tf.math.bincount(tf.cast(tf.reshape(channel, [-1]), tf.int32), minlength=256, maxlength=256)
  last_nonzero = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last_nonzero) // 255

  def equalized():
    lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.gather(lut, tf.cast(channel, tf.int32)), tf.uint8)

  return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def posterize(image, level):
  bits = tf.clip_by_value(8 - tf.cast(level * 4, tf.int32), 1, 8)  # Keeps 8 bits at 0, 4 at 10, 2 at 15.
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128.0):
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.float32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.float32) < threshold, added, image)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with a 3x3 smoothed image (borders kept)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
  degenerate = tf.where(border > 0, x[0], tf.round(smooth))
  return _blend(image, degenerate, factor)


def _transform(image, matrix):
  """Projective transform (output pixel -> input pixel), nearest neighbour, grey fill."""
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
      output_shape=shape, fill_value=_FILL, interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(image, degrees):
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  angle = degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def shear(image, amount, axis):
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if axis == "x":
    return _transform(image, tf.stack([one, amount, zero, zero, one, zero, zero, zero]))
  return _transform(image, tf.stack([one, zero, zero, amount, one, zero, zero, zero]))


def translate(image, fraction, axis):
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if axis == "x":
    dx = fraction * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, tf.stack([one, zero, -dx, zero, one, zero, zero, zero]))
  dy = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, tf.stack([one, zero, zero, zero, one, -dy, zero, zero]))


def apply_op(image, op: str, level, sign):
  """One RandAugment op at `level` (1.0 = magnitude 10); `sign` is +-1 for signed ops."""
  enhance = tf.maximum(1.0 + sign * level * 0.9, 0.0)  # timm's "increasing" enhancement factor.
  if op == "identity":
    return image
  if op == "autocontrast":
    return autocontrast(image)
  if op == "equalize":
    return equalize(image)
  if op == "invert":
    return 255 - image
  if op == "rotate":
    return rotate(image, sign * level * 30.0)
  if op == "posterize":
    return posterize(image, level)
  if op == "solarize":
    return solarize(image, tf.maximum(256.0 - level * 256.0, 0.0))
  if op == "solarize_add":
    return solarize_add(image, level * 110.0)
  if op == "color":
    return _blend(image, tf.image.grayscale_to_rgb(_grey(image)), enhance)
  if op == "contrast":
    mean = tf.reduce_mean(tf.cast(_grey(image), tf.float32))
    return _blend(image, tf.fill(tf.shape(image), mean), enhance)
  if op == "brightness":
    return _blend(image, tf.zeros_like(image), enhance)
  if op == "sharpness":
    return sharpness(image, enhance)
  if op in ("shear_x", "shear_y"):
    return shear(image, sign * level * 0.3, op[-1])
  if op in ("translate_x", "translate_y"):
    return translate(image, sign * level * 0.45, op[-1])
  raise ValueError(f"Unknown RandAugment op {op!r}; known: {OPS}.")


def randaugment(image, num_layers: int, magnitude: float, seed, ops=OPS, prob: float = 0.5):
  """uint8 [h, w, 3] -> uint8 [h, w, 3]; deterministic for a given `seed` ([2] int)."""
  level = tf.constant(magnitude / 10.0, tf.float32)
  seed = tf.cast(seed, tf.int64)

  def one_layer(layer, image):
    seeds = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, layer), 3)
    which = tf.random.stateless_uniform([], seeds[0], 0, len(ops), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[1]) < 0.5, -1.0, 1.0)
    apply = tf.random.stateless_uniform([], seeds[2]) < prob
    branches = [lambda op=op: apply_op(image, op, level, sign) for op in ops]
    augmented = tf.ensure_shape(tf.switch_case(which, branches), image.shape)
    return layer + 1, tf.where(apply, augmented, image)

  # A loop rather than unrolled layers: the 16 branches are traced once, not num_layers times.
  _, image = tf.while_loop(lambda layer, _: layer < num_layers, one_layer, (tf.constant(0, tf.int64), image))
  return image
