"""RandAugment ops against PIL (the reference the paper's ops are defined by), determinism.

Its use in the pipeline is tested in test_data.py (which prepares `digits` once).
"""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from vit_jax.data import randaugment as ra

GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(30, 220, (20, 24, 3), dtype=np.uint8)


def _close(ours, pil, max_diff):
  diff = np.abs(np.asarray(ours, np.int32) - np.asarray(pil, np.int32))
  assert diff.max() <= max_diff, diff.max()


def test_ops_match_pil(image):
  pil, t, level = Image.fromarray(image), tf.constant(image), tf.constant(0.5)
  # Exact: lookup-table and geometric ops (rotation about the centre, integer shift).
  _close(ra.equalize(t), ImageOps.equalize(pil), 0)
  _close(ra.posterize(t, 1.0), ImageOps.posterize(pil, 4), 0)
  _close(ra.solarize(t, 128.0), ImageOps.solarize(pil, 128), 0)
  _close(ra.apply_op(t, "invert", level, 1.0), ImageOps.invert(pil), 0)
  _close(ra.rotate(t, 30.0), pil.rotate(30, fillcolor=GREY), 0)
  _close(ra.translate(t, 0.25, "x"), pil.transform(pil.size, Image.AFFINE, (1, 0, -6, 0, 1, 0), fillcolor=GREY), 0)
  # PIL rounds in integer arithmetic: off by at most 1 grey level.
  _close(ra.autocontrast(t), ImageOps.autocontrast(pil), 1)
  _close(ra.apply_op(t, "color", level, 1.0), ImageEnhance.Color(pil).enhance(1.45), 1)
  _close(ra.apply_op(t, "contrast", level, 1.0), ImageEnhance.Contrast(pil).enhance(1.45), 1)
  _close(ra.apply_op(t, "brightness", level, -1.0), ImageEnhance.Brightness(pil).enhance(0.55), 1)
  _close(ra.apply_op(t, "sharpness", level, 1.0), ImageEnhance.Sharpness(pil).enhance(1.45), 1)
  np.testing.assert_array_equal(ra.shear(t, tf.constant(0.3), "x")[0], image[0])  # Row 0 does not move.


def test_every_op_keeps_dtype_and_shape(image):
  t = tf.constant(image)
  for op in ra.OPS:
    out = ra.apply_op(t, op, tf.constant(1.5), -1.0)  # Magnitude 15 is beyond the paper's 10: must not break.
    assert out.dtype == tf.uint8 and out.shape == image.shape, op


def test_randaugment_is_deterministic_per_seed(image):
  fn = lambda seed: ra.randaugment(tf.constant(image), 2, 15, tf.constant([0, seed], tf.int64)).numpy()  # Eager: fast.
  outs = [fn(s) for s in range(40)]
  np.testing.assert_array_equal(outs[3], fn(3))
  unchanged = sum(np.array_equal(o, image) for o in outs)
  assert 4 <= unchanged <= 20  # Expected ~28%: each of 2 layers is skipped with p=0.5 (or draws identity).
  assert len({o.tobytes() for o in outs}) >= 12  # Unsigned ops (invert, equalize, ...) repeat outputs.


def test_resize_small_central_crop_keeps_the_centre():
  from vit_jax.data import preprocess
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :10] = image[:, 30:] = 255  # Bright outer quarters, dark centre.
  data = tf.io.encode_png(image)
  central = preprocess.make_decode_fn(train=False, image_size=(8, 8), crop="resize_small_central_crop",
                                      crop_pct=0.5)(data, None)
  plain = preprocess.make_decode_fn(train=False, image_size=(8, 8), crop="resize", crop_pct=0.5)(data, None)
  assert central.shape == plain.shape == (8, 8, 3)
  assert float(tf.reduce_max(central)) < 1.0 and float(tf.reduce_max(plain)) > 250.0
