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
- train=True: endless stream, reshuffled every epoch from (seed, epoch) (random-access sources,
  i.e. ArrayRecord builds (digits, imagenet21k) and folders: a full permutation of the whole split
  in one global order that does not depend on the number of processes, so a run resumed with
  another process count continues it exactly; TFRecord builds: each process's share through a
  bounded shuffle buffer), Inception crop + flip (+ RandAugment), batches cross epoch ends,
  mask all True.
  train=False: one pass in fixed order, each example once; the last batch is padded
  (mask False) and every process yields the same number of batches (`it.num_batches`).
- Undecodable images (and only those: any other error is raised) are skipped, counted and logged
  with their file or record id, up to `max_bad_fraction` (default 1%) of an epoch or evaluation
  pass; beyond it `UndecodableDataError` stops the pipeline.
- `get_source(name)` opens a data set once (`.num_classes`, `.num_examples(split)`; pass it
  to `get_dataset(..., source=)`); `num_examples(name, split)`, `num_classes(name)`,
  `known_datasets()`.  "synthetic" (`vit_jax.data.synthetic`) answers without TensorFlow.
- `prefetch_to_device(iterator, size, sharding)`: global jax.Arrays from per-process batches.
- `vit_jax.data.mixup.mix(rng, images, labels_onehot, mixup_alpha=..., cutmix_alpha=...)`: in the train step.

Importing this package loads no TensorFlow: the tf.data modules load on first use.
"""
import importlib
from typing import Optional

__all__ = ["DatasetIterator", "get_dataset", "get_source", "num_classes", "num_examples", "known_datasets",
           "prefetch_to_device"]

# name -> submodule that defines it (imported on first access: pipeline and sources import TensorFlow).
_LAZY = {"DatasetIterator": "pipeline", "get_dataset": "pipeline", "known_datasets": "sources",
         "prefetch_to_device": "device"}


def get_source(name: str, data_dir: Optional[str] = None, **kwargs):
  """The data set `name`, opened once: `.num_classes`, `.num_examples(split)` (TFDS, folder or synthetic).

  kwargs (TFDS only): manual_dir, download.
  """
  from vit_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  if name == synthetic.NAME:
    return synthetic.SyntheticSource()
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.get_source(name, data_dir, **kwargs)


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples in the whole `split` (all processes together)."""
  return get_source(name, data_dir).num_examples(split)


def num_classes(name: str, data_dir: Optional[str] = None) -> int:
  return get_source(name, data_dir).num_classes


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"vit_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'vit_jax.data' has no attribute {name!r}")
