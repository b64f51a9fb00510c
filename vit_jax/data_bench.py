"""Throughput of the input pipeline alone (no model), optionally against a bare decode+resize loop.

    python -m vit_jax.data_bench --synthetic-jpegs 2000 --batch 128 --compare-bare
    python -m vit_jax.data_bench --dataset folder:/data/imagenet_folder --batch 256 --compare-bare
    python -m vit_jax.data_bench --dataset imagenet2012 --data-dir gs://... --batch 256

Prints images/s of `get_dataset` (training: Inception crop + flip + normalise, 224 px by
default), of the bare loop `tf.io.read_file -> tf.io.decode_jpeg -> tf.image.resize`
over the same files (both tf.data with AUTOTUNE parallelism, both ending in numpy),
their ratio, and the process's peak resident memory.
"""
import argparse
import os
import pathlib
import resource
import tempfile
import time

import numpy as np


def write_synthetic_jpegs(root: pathlib.Path, count: int, size=(500, 375), classes: int = 10, seed: int = 0):
  """`count` photo-like JPEGs (smooth colour fields plus texture, ~100 kB) in root/train/<class>/."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(count):
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    texture = rng.normal(0, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(coarse, np.float32) + texture, 0, 255).astype(np.uint8)
    folder = root / "train" / f"class_{i % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"img_{i:06d}.jpg", quality=90)
  return sorted(str(p) for p in (root / "train").glob("*/*.jpg"))


def bare_dataset(paths, batch: int, image_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    return tf.image.resize(image, (image_size, image_size))

  ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
  return ds.prefetch(2).as_numpy_iterator()


def images_per_second(iterator, batch: int, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default=None, help="TFDS name, digits, imagenet21k/<config>, folder:<path>")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--batch", type=int, default=128, help="per-process batch size")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--eval", action="store_true", help="evaluation pipeline instead of training")
  parser.add_argument("--randaugment", default=None, help="e.g. 2,15")
  parser.add_argument("--synthetic-jpegs", type=int, default=0,
                      help="write N 500x375 JPEGs to a temporary folder and use it as the data set")
  parser.add_argument("--compare-bare", action="store_true",
                      help="also time bare decode_jpeg + resize over the same files (folder data sets)")
  args = parser.parse_args(argv)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vit_jax import data  # pylint: disable=g-import-not-at-top

  tmp = None
  dataset = args.dataset
  if args.synthetic_jpegs:
    tmp = tempfile.TemporaryDirectory(prefix="vit_jax_bench_")
    start = time.perf_counter()
    paths = write_synthetic_jpegs(pathlib.Path(tmp.name), args.synthetic_jpegs)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"wrote {len(paths)} synthetic 500x375 JPEGs (mean {mean_kb:.0f} kB) in "
          f"{time.perf_counter() - start:.1f}s")
    dataset = f"folder:{tmp.name}"
  if dataset is None:
    parser.error("give --dataset or --synthetic-jpegs N")

  randaugment = tuple(int(v) for v in args.randaugment.split(",")) if args.randaugment else None
  it = data.get_dataset(dataset, args.split, batch_size=args.batch, image_size=args.image_size,
                        train=not args.eval, data_dir=args.data_dir, process_index=0, process_count=1,
                        randaugment=randaugment)
  pipeline = images_per_second(it, args.batch, args.steps, args.warmup)
  mode = "eval (resize)" if args.eval else "train (inception crop + flip)"
  print(f"pipeline  {dataset} {args.split} {mode} {args.image_size}px batch {args.batch}: "
        f"{pipeline:,.0f} images/s")
  if args.compare_bare:
    if not dataset.startswith("folder:"):
      parser.error("--compare-bare needs a folder data set (folder:<path> or --synthetic-jpegs)")
    from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
    paths = sources.FolderSource(dataset[len("folder:"):])._files_of(args.split)[0]  # pylint: disable=protected-access
    bare = images_per_second(bare_dataset(paths, args.batch, args.image_size), args.batch, args.steps,
                             args.warmup)
    print(f"bare      tf.io.decode_jpeg + tf.image.resize {args.image_size}px batch {args.batch}: "
          f"{bare:,.0f} images/s")
    print(f"ratio     pipeline / bare = {pipeline / bare:.2f}")
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak resident memory {peak_mib:,.0f} MiB")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
