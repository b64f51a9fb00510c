"""Mixup/CutMix (pure JAX) and prefetch_to_device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.data import device, mixup


def _batch(b=8, h=12, w=10, k=5):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(b, h, w, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.arange(b) % k, k)  # Example 0 is class 0, its partner (7) class 2.
  return images, labels


@functools.cache
def _mixer():
  # One compilation serves every test (jax.random.beta compiles slowly): switch_prob 0 is
  # always Mixup, 1 always CutMix.
  return jax.jit(lambda rng, x, y, switch_prob: mixup.mix(rng, x, y, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                          switch_prob=switch_prob))


def test_alpha_zero_is_identity():
  images, labels = _batch()
  out_images, out_labels = mixup.mix(jax.random.key(0), images, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
  assert out_images is images and out_labels is labels


def test_mixup_is_convex_combination_with_partner():
  images, labels = _batch()
  out_images, out_labels = _mixer()(jax.random.key(1), images, labels, 0.0)
  np.testing.assert_allclose(out_labels.sum(-1), 1.0, atol=1e-6)
  lam = float(out_labels[0, 0])
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(out_labels, lam * labels + (1 - lam) * labels[::-1], atol=1e-6)
  np.testing.assert_allclose(out_images, lam * images + (1 - lam) * images[::-1], atol=1e-5)


def test_cutmix_pixels_come_from_box_and_labels_follow_area():
  images, labels = _batch()
  for seed in range(3):
    out_images, out_labels = _mixer()(jax.random.key(seed), images, labels, 1.0)
    from_partner = np.all(np.isclose(out_images, images[::-1]), axis=-1)
    from_self = np.all(np.isclose(out_images, images), axis=-1)
    assert np.all(from_partner | from_self)
    assert np.all(from_partner == from_partner[:1])  # One box for the whole batch.
    lam = 1.0 - from_partner[0].mean()
    np.testing.assert_allclose(out_labels, lam * labels + (1 - lam) * labels[::-1], atol=1e-6)


def test_switch_uses_both_and_is_deterministic():
  images, labels = _batch()
  kinds = set()
  for seed in range(10):
    out = _mixer()(jax.random.key(seed), images, labels, 0.5)
    np.testing.assert_array_equal(out[0], _mixer()(jax.random.key(seed), images, labels, 0.5)[0])
    kinds.add(bool(np.all(np.isclose(out[0], images) | np.isclose(out[0], images[::-1]))))
    np.testing.assert_allclose(out[1].sum(-1), 1.0, atol=1e-6)
  assert kinds == {True, False}  # Both CutMix and Mixup happened.
  with pytest.raises(ValueError, match="alpha"):
    mixup.mix(jax.random.key(0), images, labels, mixup_alpha=-1.0)


class _Counter:
  """A get_dataset-like iterator: batch i holds the value i; state = batches handed out."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    if self.i == 5:
      raise StopIteration
    self.i += 1
    return {"image": np.full((8, 2), self.i - 1, np.float32), "label": np.arange(8, dtype=np.int32)}

  def get_state(self):
    return {"batches": self.i}

  def set_state(self, state):
    self.i = state["batches"]


def test_prefetch_to_device_global_arrays_and_state():
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  it = device.prefetch_to_device(_Counter(), 2, sharding)
  first = next(it)
  assert isinstance(first["image"], jax.Array) and first["image"].sharding == sharding
  assert len(first["label"].addressable_shards) == 4 and first["label"].addressable_shards[0].data.shape == (2,)
  assert it.get_state() == {"batches": 1}  # Not the prefetched position (3).
  it.set_state({"batches": 3})
  assert [float(b["image"][0, 0]) for b in it] == [3.0, 4.0]
