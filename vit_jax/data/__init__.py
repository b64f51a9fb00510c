"""Input pipelines (tf.data on CPU) and our TFDS builders.

Public entry point (other tools rely on it):

    it = vit_jax.data.get_dataset(name, split, *, batch_size, image_size, train, seed=0,
                                  data_dir=None, process_index=None, process_count=None)
    # iterator of numpy dicts: image float32 [b, h, w, 3], label int32 [b], mask bool [b]
    state = it.get_state()   # JSON-serialisable; one per process (save each process's)
    it.set_state(state)      # next batches = those an uninterrupted iterator would yield
    it.reset()               # back to the start (another evaluation pass)

- `batch_size` is per process (global batch // process_count).
- name: any TFDS name ("cifar10", "imagenet2012", ...), "digits" (scikit-learn's
  8x8 digits, our builder, prepares itself offline), "imagenet21k/fall11" or
  "imagenet21k/winter21" (our builder, manual download), "folder:<root>" with
  `<root>/<split>/<class>/*.jpg`.
- train=True: endless stream, reshuffled every epoch from (seed, epoch) (a full permutation
  for random-access sources: ArrayRecord builds, folders; a bounded shuffle buffer for
  TFRecord builds), Inception crop + flip (+ RandAugment), batches cross epoch ends,
  mask all True.  Each process drops the split's remainder so all shares are equal.
  train=False: one pass in fixed order, each example once; the last batch is padded
  (mask False) and every process yields the same number of batches (`it.num_batches`).
- Undecodable images are dropped and counted in the log, never a crash mid-epoch.
- `num_examples(name, split)`, `num_classes(name)`, `known_datasets()`.
- `prefetch_to_device(iterator, size, sharding)`: global jax.Arrays from per-process batches.
- `vit_jax.data.mixup.mix(rng, images, labels_onehot, mixup_alpha=..., cutmix_alpha=...)`: in the train step.
"""
from vit_jax.data.pipeline import DatasetIterator, get_dataset, num_classes, num_examples
from vit_jax.data.sources import known_datasets

__all__ = ["DatasetIterator", "get_dataset", "num_classes", "num_examples", "known_datasets",
           "prefetch_to_device"]


def __getattr__(name):
  if name == "prefetch_to_device":
    from vit_jax.data.device import prefetch_to_device  # pylint: disable=g-import-not-at-top
    return prefetch_to_device
  raise AttributeError(f"module 'vit_jax.data' has no attribute {name!r}")
