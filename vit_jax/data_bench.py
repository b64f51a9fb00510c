"""Throughput of the input pipeline alone (no model), optionally against a bare decode+resize loop.

    python -m vit_jax.data_bench --synthetic-jpegs 1000 --batch 64 --compare-bare --repeats 3
    python -m vit_jax.data_bench --dataset folder:/data/imagenet_folder --batch 256 --compare-bare
    python -m vit_jax.data_bench --dataset imagenet2012 --data-dir gs://... --batch 256

Prints images/s of `get_dataset` (training: Inception crop + flip + normalise, 224 px by
default) and, with --compare-bare, of the bare loop `tf.io.read_file -> tf.io.decode_jpeg
-> tf.image.resize` over the same files (both tf.data with AUTOTUNE parallelism, both
ending in numpy batches), and their ratio.  Each measurement runs in its own process,
pipeline and bare alternating `--repeats` times; medians are reported.  Besides wall-clock
images/s it reports images per CPU-second (process CPU time, all threads), which stays
comparable when other jobs share the machine.  Also the peak resident memory.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_synthetic_jpegs(root: pathlib.Path, count: int, size=(500, 375), classes: int = 10, seed: int = 0):
  """`count` photo-like JPEGs (smooth colour fields plus texture, ~75 kB) in root/train/<class>/."""
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


def measure(iterator, batch: int, steps: int, warmup: int) -> dict:
  for _ in range(warmup):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(iterator)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {"images_per_s": steps * batch / wall, "images_per_cpu_s": steps * batch / cpu,
          "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _folder_paths(dataset: str, split: str):
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.FolderSource(dataset[len(sources.FOLDER_PREFIX):])._files_of(split)[0]  # pylint: disable=protected-access


def _measure_one(args, which: str) -> dict:
  """One measurement in this process."""
  if which == "bare":
    iterator = bare_dataset(_folder_paths(args.dataset, args.split), args.batch, args.image_size)
  else:
    from vit_jax import data  # pylint: disable=g-import-not-at-top
    randaugment = tuple(int(v) for v in args.randaugment.split(",")) if args.randaugment else None
    iterator = data.get_dataset(args.dataset, args.split, batch_size=args.batch, image_size=args.image_size,
                                train=not args.eval, data_dir=args.data_dir, process_index=0,
                                process_count=1, randaugment=randaugment)
  return measure(iterator, args.batch, args.steps, args.warmup)


def _measure_in_subprocess(argv, which: str) -> dict:
  out = subprocess.run([sys.executable, "-m", "vit_jax.data_bench", *argv, "--only", which],
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default=None, help="TFDS name, digits, imagenet21k/<config>, folder:<path>")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--batch", type=int, default=128, help="per-process batch size")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--eval", action="store_true", help="evaluation pipeline instead of training")
  parser.add_argument("--randaugment", default=None, help="e.g. 2,15")
  parser.add_argument("--synthetic-jpegs", type=int, default=0,
                      help="write N 500x375 JPEGs to a temporary folder and use it as the data set")
  parser.add_argument("--compare-bare", action="store_true",
                      help="also time bare decode_jpeg + resize over the same files (folder data sets)")
  parser.add_argument("--repeats", type=int, default=1, help="alternating measurements; medians reported")
  parser.add_argument("--only", choices=["pipeline", "bare"], help=argparse.SUPPRESS)  # Child processes.
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  if args.only:
    print(json.dumps(_measure_one(args, args.only)))
    return

  tmp = None
  if args.synthetic_jpegs:
    tmp = tempfile.TemporaryDirectory(prefix="vit_jax_bench_")
    start = time.perf_counter()
    paths = write_synthetic_jpegs(pathlib.Path(tmp.name), args.synthetic_jpegs)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"wrote {len(paths)} synthetic 500x375 JPEGs (mean {mean_kb:.0f} kB) in "
          f"{time.perf_counter() - start:.1f}s")
    args.dataset = f"folder:{tmp.name}"
  if args.dataset is None:
    parser.error("give --dataset or --synthetic-jpegs N")
  if args.compare_bare and not args.dataset.startswith("folder:"):
    parser.error("--compare-bare needs a folder data set (folder:<path> or --synthetic-jpegs)")

  child_argv = ["--dataset", args.dataset, "--split", args.split, "--batch", str(args.batch),
                "--image-size", str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
  child_argv += (["--data-dir", args.data_dir] if args.data_dir else []) + (["--eval"] if args.eval else [])
  child_argv += ["--randaugment", args.randaugment] if args.randaugment else []
  kinds = ["pipeline", "bare"] if args.compare_bare else ["pipeline"]
  runs = {k: [] for k in kinds}
  for _ in range(args.repeats):
    for kind in kinds:  # Alternating: both see the machine's ups and downs about equally.
      runs[kind].append(_measure_in_subprocess(child_argv, kind))

  def summary(kind):
    wall = [r["images_per_s"] for r in runs[kind]]
    cpu = [r["images_per_cpu_s"] for r in runs[kind]]
    listing = f" (runs: {', '.join(f'{v:,.0f}' for v in wall)})" if len(wall) > 1 else ""
    return np.median(wall), np.median(cpu), max(r["peak_mib"] for r in runs[kind]), listing

  mode = "eval (resize)" if args.eval else "train (inception crop + flip)"
  wall, cpu, peak, listing = summary("pipeline")
  print(f"pipeline  {args.dataset} {args.split} {mode} {args.image_size}px batch {args.batch}: "
        f"{wall:,.0f} images/s{listing}, {cpu:,.0f} images/CPU-s, peak RSS {peak:,.0f} MiB")
  if args.compare_bare:
    bare_wall, bare_cpu, bare_peak, bare_listing = summary("bare")
    print(f"bare      tf.io.decode_jpeg + tf.image.resize {args.image_size}px batch {args.batch}: "
          f"{bare_wall:,.0f} images/s{bare_listing}, {bare_cpu:,.0f} images/CPU-s, peak RSS {bare_peak:,.0f} MiB")
    print(f"ratio     pipeline / bare = {wall / bare_wall:.2f} (wall clock), {cpu / bare_cpu:.2f} (per CPU-second)")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
