"""Per-example preprocessing as tf.data graph ops (decode, crop, resize, flip, normalise).

Everything random is *stateless*: each example gets its own seed (derived from the
run seed, the epoch and its position in the epoch), so the output depends only
on those numbers, never on thread timing or on how far another iterator got.
That is what makes the input stream reproducible and resumable.
"""
import tensorflow as tf

CROPS = ("inception", "resize", "resize_small_central_crop")
NORMALIZATIONS = ("minus_one_one", "imagenet", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3]; grey and RGBA become RGB."""
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def inception_box(shape: tf.Tensor, seed: tf.Tensor, area_range=(0.05, 1.0),
                  aspect_ratio_range=(3 / 4, 4 / 3)):
  """Random crop window (offset_y, offset_x, h, w) covering 5-100% of the area, like Inception."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=aspect_ratio_range,
      area_range=area_range, max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def decode_and_inception_crop(data: tf.Tensor, seed: tf.Tensor, area_range=(0.05, 1.0)) -> tf.Tensor:
  """Decodes only the crop window for JPEGs (much cheaper than decoding the whole image)."""
  def jpeg():
    y, x, h, w = inception_box(tf.image.extract_jpeg_shape(data), seed, area_range)
    return tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)

  def other():
    image = decode_image(data)
    y, x, h, w = inception_box(tf.shape(image), seed, area_range)
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  """Bilinear resize to `size` (float32 output, values still 0..255), as the official ViT code."""
  return tf.image.resize(image, size, method="bilinear")


def resize_small_central_crop(image: tf.Tensor, size: tuple[int, int], crop_pct: float) -> tf.Tensor:
  """timm-style eval transform: shorter side to size/crop_pct (bicubic), then central crop to `size`."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = tf.cast(max(size), tf.float32) / crop_pct
  scale = target / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), tf.constant(size, tf.int32))
  image = tf.image.resize(image, new_hw, method="bicubic")
  top = (new_hw[0] - size[0]) // 2
  left = (new_hw[1] - size[1]) // 2
  return image[top:top + size[0], left:left + size[1]]


def normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
  """0..255 -> [-1, 1] (official ViT weights) or ImageNet mean/std (timm CrossViT/MaxViT)."""
  image = tf.cast(image, tf.float32)
  if normalization == "minus_one_one":
    return image / 127.5 - 1.0
  if normalization == "imagenet":
    return (image / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
  if normalization == "none":
    return image
  raise ValueError(f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}.")


def check_options(crop: str, normalization: str):
  if crop not in CROPS:
    raise ValueError(f"Unknown crop {crop!r}; use one of {CROPS}.")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}.")


def make_decode_only_fn(*, train: bool, crop: str, area_range=(0.05, 1.0)):
  """Returns fn(encoded_bytes, seed) -> uint8 [h, w, 3]: the only step that fails on a bad file.

  The input pipeline skips (and counts) exactly the examples this step fails on; every later step
  (`make_resize_fn`, `make_augment_fn`) runs outside that net, so a wrong option is an error, not a
  silently shrunken data set.  With the Inception crop the JPEG decoder reads only the crop window.
  """
  def decode(data, seed):
    if train and crop == "inception":
      return decode_and_inception_crop(data, seed, area_range)
    return decode_image(data)
  return decode


def make_resize_fn(*, train: bool, image_size: tuple[int, int], crop: str, crop_pct: float):
  """Returns fn(uint8 image) -> float32 [h, w, 3] in 0..255 (after `make_decode_only_fn`)."""
  del train  # the Inception crop window was chosen while decoding

  def finish(image):
    if crop == "resize_small_central_crop":
      return resize_small_central_crop(image, image_size, crop_pct)
    return resize(image, image_size)
  return finish


def make_decode_fn(*, train: bool, image_size: tuple[int, int], crop: str, crop_pct: float,
                   area_range=(0.05, 1.0)):
  """Returns fn(encoded_bytes, seed) -> float32 [h, w, 3] in 0..255 (decode, crop and resize in one)."""
  decode = make_decode_only_fn(train=train, crop=crop, area_range=area_range)
  finish = make_resize_fn(train=train, image_size=image_size, crop=crop, crop_pct=crop_pct)
  return lambda data, seed: finish(decode(data, seed))


def check_area_range(area_range) -> None:
  """The Inception crop's area range must be 0 < low <= high <= 1 (checked before any image is read)."""
  try:
    low, high = (float(a) for a in area_range)
  except (TypeError, ValueError):
    raise ValueError(f"area_range must be (low, high), e.g. (0.05, 1.0); got {area_range!r}.") from None
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, e.g. (0.05, 1.0); got {area_range!r}.")


def make_augment_fn(*, train: bool, flip: bool, randaugment, normalization: str):
  """Returns fn(image float32 0..255, seed) -> normalised float32 image (never fails)."""
  def augment(image, seed):
    if train and randaugment:
      from vit_jax.data import randaugment as ra  # pylint: disable=g-import-not-at-top
      num_layers, magnitude = randaugment
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      image = ra.randaugment(image, num_layers, magnitude, tf.random.experimental.stateless_fold_in(seed, 1))
    if train and flip:
      image = tf.image.stateless_random_flip_left_right(image, tf.random.experimental.stateless_fold_in(seed, 2))
    return normalize(image, normalization)
  return augment
