"""Markdown table of benchmark results (the JSON lines that `python -m vit_jax.bench --out` appends).

  python benchmarks/table.py benchmarks/results/cpu.jsonl [more.jsonl ...]

One row per measured configuration (lines without img_per_sec, e.g. --find-max-batch or failed
sweep entries, are left out). Imports nothing beyond the standard library.
"""
from __future__ import annotations

import json
import pathlib
import sys

COLUMNS = (("model", "model"), ("mode", "mode"), ("batch", "batch"), ("image_size", "px"),
           ("dtype", "dtype"), ("device", "device"), ("img_per_sec", "img/s"), ("step_ms", "step ms"),
           ("compile_s", "compile s"), ("mfu", "MFU"), ("timm_eager_img_per_sec", "timm eager img/s"),
           ("timm_compile_img_per_sec", "timm compile img/s"), ("vs_timm_eager", "x eager"),
           ("vs_timm_compile", "x compile"), ("peak_memory_bytes", "peak GiB"))


def read_results(paths) -> list[dict]:
  rows = []
  for path in paths:
    rows += [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.startswith("{")]
  return rows


def cell(row: dict, key: str) -> str:
  value = row.get(key)
  if key == "model":
    return value + (" (remat)" if row.get("remat") else "") + (" (scan)" if row.get("scan") else "")
  if value is None:
    return "-"
  if key == "image_size":
    return str(value[0])
  if key == "peak_memory_bytes":
    return f"{value / 2**30:.1f}"
  if key == "mfu":
    return f"{100 * value:.1f}%"
  if isinstance(value, float):
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
  return str(value)


def markdown_table(paths) -> str:
  lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in read_results(paths):
    if "img_per_sec" in row:
      lines.append("| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__, file=sys.stderr)
    return 2
  print(markdown_table(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
