r"""The ViT paper's pictures of a model, as PNG figures and the numbers behind them as CSV.

    python -m vit_jax.analyze --workdir /tmp/vit_digits --out /tmp/figures             # the run's test images
    python -m vit_jax.analyze --workdir /tmp/vit_digits --random-init --out /tmp/random  # the same model, untrained
    python -m vit_jax.analyze --model ViT-B_16 --weights ViT-B_16.npz --images cat.jpg --out /tmp/b16

Writes into --out (for the families where they exist):

  attention_distance.png/.csv  mean attention distance of every head against depth (Fig. 7 right);
                               one panel per kind of attention (ViT: self; CrossViT: each branch;
                               MaxViT: block and grid), one colour per head
  posemb_similarity.png/.csv   cosine similarity of each learned position embedding with all others
                               (Fig. 7 centre), per embedding table
  embedding_filters.png/.csv   top principal components of the convolutions that read RGB (Fig. 7 left)
  attention_rollout.png/.csv   per image: the input, the attention rollout of the class token over all
                               layers (Fig. 6; per branch for CrossViT), and the class token's
                               attention in each layer (mean over heads)
  cross_attention.png/.csv     CrossViT: each branch's class token onto the other branch's patches;
                               ViT classifier='map': the pooling probe's attention
  window_attention.png/.csv    MaxViT: where the centre position looks in each block and grid attention
  summary.txt                  per layer: min / median / max head distance (also printed)

Images come from --images, or the first --num-images of a data set split (default: a --workdir
run's evaluation split), with the preprocessing of `python -m vit_jax.predict`.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import operator
import os
import sys
from collections import defaultdict

import numpy as np

MAX_SHOWN = 6  # images in the per-image figures (all --num-images enter the distances)


# ----------------------------------------------------------------------------- inputs

def _displayable(images: np.ndarray, normalization: str) -> np.ndarray:
  """Normalised model inputs back to RGB in [0, 1]."""
  from vit_jax.data import preprocess
  if normalization == "minus_one_one":
    images = (images + 1.0) / 2.0
  elif normalization == "imagenet":
    images = images * np.asarray(preprocess.IMAGENET_STD) + np.asarray(preprocess.IMAGENET_MEAN)
  else:
    images = images / 255.0
  return np.clip(images, 0.0, 1.0)


def _dataset_images(args, opened, image_size) -> np.ndarray:
  from vit_jax import data
  run = opened.config or {}
  dataset = args.dataset or run.get("dataset")
  split = args.split or run.get("eval_split", "test")
  data_dir = args.data_dir or run.get("data_dir", "") or None
  try:
    batches = data.get_dataset(dataset, split, batch_size=args.num_images, image_size=image_size, train=False,
                               data_dir=data_dir, process_index=0, process_count=1,
                               normalization=opened.normalization, crop=opened.crop, crop_pct=opened.crop_pct)
    batch = next(iter(batches))
  except StopIteration:
    raise SystemExit(f"{dataset} {split!r} holds no examples.")
  except Exception as e:  # an unknown name lists the choices; TFDS says what is missing
    raise SystemExit(f"cannot read images from data set {dataset!r} split {split!r}: {e}")
  return batch["image"][batch["mask"]]


# ----------------------------------------------------------------------------- outputs

def _write_csv(path: str, header: list[str], rows) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _save(fig, path: str) -> None:
  fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
  import matplotlib.pyplot as plt
  plt.close(fig)


def _overlay(ax, image: np.ndarray, weights: np.ndarray | None, title: str = "") -> None:
  """`image` with `weights` (any grid over the whole image) on top, 0 to their maximum: a uniform map
  stays uniformly bright instead of being stretched into a pattern."""
  h, w = image.shape[:2]
  ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
  if weights is not None:
    ax.imshow(weights / max(float(weights.max()), 1e-12), cmap="inferno", alpha=0.6, extent=(0, w, h, 0),
              interpolation="bilinear", vmin=0.0, vmax=1.0)
  ax.set_title(title, fontsize=7)
  ax.axis("off")


def _branches(captured) -> int:
  """How many token branches the captured model has (CrossViT: 2)."""
  return 1 + max((layer.layout.branch for layer in captured["layers"].values() if layer.layout), default=0)


def _map_rows(name: str, maps: np.ndarray):
  """CSV rows (figure, image, row, col, weight) of [images, h, w] maps."""
  for i, grid in enumerate(maps):
    for (r, c), value in np.ndenumerate(grid):
      yield name, i, r, c, f"{value:.6g}"


def attention_distance_figure(out: str, captured, image_size) -> dict[str, np.ndarray]:
  """Scatter of every head's distance against depth, one panel per kind of attention."""
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  distances, groups, rows = {}, defaultdict(list), []
  for name, layer in captured["layers"].items():
    per_head = analysis.layer_attention_distance(layer)
    if per_head is None:
      continue
    distances[name] = per_head
    layout = layer.layout
    if layout.kind == "self":
      group = "self-attention" + (f", branch {layout.branch}" if _branches(captured) > 1 else "")
    else:
      group = f"{layout.kind} attention"
    groups[group].append((name, per_head))
    rows += [(name, layout.depth, layout.kind, layout.branch, h, f"{d:.4f}") for h, d in enumerate(per_head)]
  if not distances:
    return distances
  _write_csv(os.path.join(out, "attention_distance.csv"),
             ["layer", "depth", "kind", "branch", "head", "mean_distance_px"], rows)
  fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 2.8), dpi=100, squeeze=False)
  cmap = plt.get_cmap("tab20")
  for ax, (group, members) in zip(axes[0], groups.items()):
    for index, (_, per_head) in enumerate(members):
      ax.scatter(np.full(len(per_head), index), per_head, c=[cmap(h % 20) for h in range(len(per_head))], s=14)
    ax.set_title(group, fontsize=8)
    ax.set_xlabel("network depth (layer)", fontsize=8)
    ax.set_ylim(0, max(max(image_size) * 0.75, 1.05 * max(np.max(d) for _, d in members)))
    ax.set_xticks(range(len(members)))
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel("mean attention distance (pixels)", fontsize=8)
  _save(fig, os.path.join(out, "attention_distance.png"))
  return distances


def posemb_figure(out: str, model, params) -> list[str]:
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  tables = model.position_embeddings()
  if not tables:
    return []
  rows = []
  fig, axes = plt.subplots(1, len(tables), figsize=(3.6 * len(tables), 3.6), dpi=100, squeeze=False)
  for ax, (path, (grid, _)) in zip(axes[0], tables.items()):
    table = functools.reduce(operator.getitem, path.split("/"), params)
    similarity = analysis.posemb_similarity(table, grid)
    gh, gw = grid
    # The paper's layout: tile (r, c) shows the similarity of position (r, c) with every position.
    mosaic = np.full((gh * (gh + 1), gw * (gw + 1)), np.nan)
    for r in range(gh):
      for c in range(gw):
        mosaic[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = similarity[r, c]
    image = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(f"position embedding similarity\n{path}", fontsize=7)
    ax.set_xlabel("input patch column", fontsize=7)
    ax.set_ylabel("input patch row", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    rows += [(path, *index, f"{value:.6f}") for index, value in np.ndenumerate(similarity)]
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.7, label="cosine similarity")
  _write_csv(os.path.join(out, "posemb_similarity.csv"),
             ["embedding", "query_row", "query_col", "key_row", "key_col", "cosine"], rows)
  _save(fig, os.path.join(out, "posemb_similarity.png"))
  return list(tables)


def filters_figure(out: str, params) -> list[str]:
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  try:
    filters = analysis.embedding_filters(params)
  except ValueError:
    return []
  columns = 7
  rows_per_kernel = [math.ceil(len(f.tiles) / columns) for f in filters.values()]
  fig, axes = plt.subplots(sum(rows_per_kernel), columns, figsize=(columns * 0.8, sum(rows_per_kernel) * 0.95),
                           dpi=100, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  row, rows = 0, []
  for (path, result), count in zip(filters.items(), rows_per_kernel):
    for i, tile in enumerate(result.tiles):
      ax = axes[row + i // columns][i % columns]
      ax.imshow(tile, interpolation="nearest")
      ax.set_title(f"{i + 1}", fontsize=6)
    axes[row][0].set_title(f"{path}\n1", fontsize=6, loc="left")
    rows += [(path, i + 1, f"{v:.6f}") for i, v in enumerate(result.explained_variance_ratio)]
    row += count
  _write_csv(os.path.join(out, "embedding_filters.csv"), ["kernel", "component", "explained_variance_ratio"], rows)
  _save(fig, os.path.join(out, "embedding_filters.png"))
  return list(filters)


def rollout_figure(out: str, captured, shown: np.ndarray) -> bool:
  """Per branch: input, rollout of the class token, then each layer's class-token attention."""
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  branches = defaultdict(list)
  for name, layer in captured["layers"].items():
    if layer.layout is not None and layer.layout.kind == "self":
      branches[layer.layout.branch].append((name, layer))
  if not branches:
    return False
  n = len(shown)
  columns = [("input", None)]
  csv_rows = []
  for branch, members in branches.items():
    rollout = analysis.attention_rollout([layer.attention for _, layer in members])
    label = "rollout" + (f" (branch {branch})" if len(branches) > 1 else "")
    maps = analysis.rollout_map(rollout, members[0][1].layout)
    columns.append((label, maps))
    csv_rows += _map_rows(label, maps[:n])
    if members[0][1].layout.num_prefix_tokens:
      for name, layer in members:
        columns.append((name.rsplit("/", 1)[-1], analysis.class_token_map(layer)))
        csv_rows += _map_rows(f"class token, {name}", columns[-1][1][:n])
  fig, axes = plt.subplots(n, len(columns), figsize=(1.25 * len(columns), 1.35 * n), dpi=100, squeeze=False)
  for i in range(n):
    for j, (title, maps) in enumerate(columns):
      _overlay(axes[i][j], shown[i], None if maps is None else maps[i], title if i == 0 else "")
  _write_csv(os.path.join(out, "attention_rollout.csv"), ["map", "image", "row", "col", "weight"], csv_rows)
  _save(fig, os.path.join(out, "attention_rollout.png"))
  return True


def cross_attention_figure(out: str, captured, shown: np.ndarray) -> bool:
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  layers = [(name, layer) for name, layer in captured["layers"].items()
            if layer.layout is not None and layer.layout.kind == "cross"]
  if not layers:
    return False
  n, csv_rows = len(shown), []
  fig, axes = plt.subplots(n, len(layers) + 1, figsize=(1.5 * (len(layers) + 1), 1.45 * n), dpi=100, squeeze=False)
  for j, (name, layer) in enumerate(layers):
    maps = analysis.class_token_map(layer)
    title = name.replace("/", "\n") + (f"\nonto branch {layer.layout.branch}" if _branches(captured) > 1 else "")
    csv_rows += _map_rows(name, maps[:n])
    for i in range(n):
      _overlay(axes[i][j + 1], shown[i], maps[i], title if i == 0 else "")
  for i in range(n):
    _overlay(axes[i][0], shown[i], None, "input" if i == 0 else "")
  _write_csv(os.path.join(out, "cross_attention.csv"), ["layer", "image", "row", "col", "weight"], csv_rows)
  _save(fig, os.path.join(out, "cross_attention.png"))
  return True


def window_attention_figure(out: str, captured, shown: np.ndarray) -> bool:
  """MaxViT: the attention of the position at the centre of each block/grid layer's feature map."""
  import matplotlib.pyplot as plt
  from vit_jax import analysis
  layers = [(name, layer) for name, layer in captured["layers"].items()
            if layer.layout is not None and layer.layout.kind in ("block", "grid")]
  if not layers:
    return False
  n, csv_rows = len(shown), []
  fig, axes = plt.subplots(n, len(layers) + 1, figsize=(1.3 * (len(layers) + 1), 1.4 * n), dpi=100, squeeze=False)
  for j, (name, layer) in enumerate(layers):
    h, w = layer.layout.feature_size
    maps = analysis.query_map(layer, h // 2, w // 2)
    csv_rows += _map_rows(name, maps[:n])
    for i in range(n):
      _overlay(axes[i][j + 1], shown[i], maps[i], name.replace("/", "\n") if i == 0 else "")
  for i in range(n):
    _overlay(axes[i][0], shown[i], None, "input" if i == 0 else "")
  _write_csv(os.path.join(out, "window_attention.csv"), ["layer", "image", "row", "col", "weight"], csv_rows)
  _save(fig, os.path.join(out, "window_attention.png"))
  return True


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
  from vit_jax import predict
  p = argparse.ArgumentParser(prog="python -m vit_jax.analyze", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  predict.add_model_arguments(p, random_init=True)
  p.add_argument("--images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
  p.add_argument("--dataset", help="TFDS name, digits, folder:PATH (default: a --workdir run's)")
  p.add_argument("--split", help="default: a run's evaluation split, else test")
  p.add_argument("--data-dir", help="TFDS data directory (default: a run's, else TFDS's)")
  p.add_argument("--num-images", type=int, default=64, help="images from --dataset (all enter the distances)")
  p.add_argument("--out", required=True, help="directory for the figures and CSV files")
  args = p.parse_args(argv)
  predict.check_model_arguments(p, args, random_init=True)
  if args.images and args.dataset:
    p.error("give --images or --dataset, not both.")
  if not args.images and not args.dataset and not args.workdir:
    p.error("give --images or --dataset (a --workdir run defaults to its evaluation split).")
  if args.num_images < 1:
    p.error("--num-images must be positive.")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("the figures need matplotlib: pip install 'vit_jax[analysis]' (or pip install matplotlib).")
  matplotlib.use("Agg")  # files only, no display
  from vit_jax import analysis, predict
  from vit_jax.models import layers

  opened = predict.open_model(args)
  model = opened.model
  image_size = layers.to_2tuple(model.image_size)
  if args.images:
    images = predict.load_images(args.images, image_size, opened.crop, opened.crop_pct, opened.normalization)
  else:
    images = _dataset_images(args, opened, image_size)
  try:
    captured = analysis.capture(model, opened.variables, images)
  except ValueError as e:  # e.g. images of another size than the model takes
    raise SystemExit(str(e))
  os.makedirs(args.out, exist_ok=True)
  shown = _displayable(np.asarray(images[:MAX_SHOWN]), opened.normalization)
  params = opened.variables["params"]
  distances = attention_distance_figure(args.out, captured, image_size)
  written = ["attention_distance"] if distances else []
  written += ["posemb_similarity"] if posemb_figure(args.out, model, params) else []
  written += ["embedding_filters"] if filters_figure(args.out, params) else []
  written += ["attention_rollout"] if rollout_figure(args.out, captured, shown) else []
  written += ["cross_attention"] if cross_attention_figure(args.out, captured, shown) else []
  written += ["window_attention"] if window_attention_figure(args.out, captured, shown) else []
  summary = [f"{type(model).__name__} on {len(images)} images of {image_size[0]}x{image_size[1]} px; "
             "mean attention distance per layer over its heads:"] + analysis.summarize_distances(distances)
  with open(os.path.join(args.out, "summary.txt"), "w") as f:
    f.write("\n".join(summary) + "\n")
  print("\n".join(summary))
  print(f"wrote {', '.join(f'{name}.png/.csv' for name in written)} and summary.txt to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
