"""Markdown tables of benchmark results: the JSON lines that `python -m vit_jax.bench --out` and
`python -m vit_jax.aot --json` append.

  python benchmarks/table.py benchmarks/results/cpu.jsonl [more.jsonl ...]
  python benchmarks/table.py benchmarks/results/tpu_aot.jsonl

One row per measured configuration (bench lines without img_per_sec, e.g. --find-max-batch or failed
sweep entries, are left out); compiled-ahead-of-time rows (they name a `topology`) get their own table,
estimates labelled as such. Imports nothing beyond the standard library.
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
  rows = read_results(paths)
  tables = []
  measured = [row for row in rows if "img_per_sec" in row]
  if measured:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |" for row in measured]
    tables.append("\n".join(lines))
  compiled = [row for row in rows if "topology" in row]
  if compiled:
    tables.append(aot_table(compiled))
  return "\n\n".join(tables)


# Estimates as ranges: from perfect overlap of compute, HBM traffic and collectives (the roofline, whose bound is
# named) to none at all (their sum).
AOT_TITLES = ("model", "params", "pod", "mesh (data×fsdp×tensor)", "batch", "optimiser", "remat", "memory / chip",
              "fits", "compile", "est. step (bound)", "est. img/s/chip", "est. MFU", "est. 90 ep. i21k")


def _remat(row: dict) -> str:
  if not row.get("remat"):
    return "none"
  policy = row.get("remat_policy") or "nothing_saveable"
  return {"nothing_saveable": "full", "dots_with_no_batch_dims_saveable": "dots kept"}.get(policy, policy)


def aot_cells(row: dict) -> list[str]:
  """One row of `python -m vit_jax.aot`: memory and compile time measured, the rest estimates."""
  gib = 2 ** 30
  memory, estimate = row["memory"], row.get("estimate")
  mesh = "×".join(str(row["mesh"][axis]) for axis in ("data", "fsdp", "tensor"))
  if "total" in memory:
    used = f"{memory['total'] / gib:.2f} GiB / {memory['hbm'] / gib:.2f} GiB"
  else:  # the TPU compiler stopped: its message says how much it needed
    needed = memory.get("compiler", "").split("(")[1].split(")")[0] if "(" in memory.get("compiler", "") else "?"
    used = f"> {needed} temporaries"
  cells = [row["model"], f"{row['params'] / 1e6:.0f} M", f"{row['topology']} ({row['devices']} chips)", mesh,
           str(row["batch_size"]), row["optimizer"], _remat(row), used,
           "yes" if memory["fits"] else "**no**", f"{row['compile_s']:.0f} s"]
  if estimate is None:
    return cells + ["—"] * 4
  step, bound = estimate["step_s"], estimate["bound"]
  serial = estimate["compute_s"] + estimate["hbm_s"] + estimate["ici_s"]
  slower = serial / step
  hours = estimate["days_90_epochs_i21k"] * 24
  return cells + [f"{step * 1e3:.0f}–{serial * 1e3:.0f} ms ({bound})",
                  f"{estimate['img_s_per_chip'] / slower:.0f}–{estimate['img_s_per_chip']:.0f}",
                  f"{100 * estimate['mfu'] / slower:.0f}–{100 * estimate['mfu']:.0f}%",
                  f"{hours:.1f}–{hours * slower:.1f} h"]


def aot_order(rows: list[dict]) -> list[dict]:
  """By pod, then model size; variants of one model on one pod stay in the order they were compiled."""
  return sorted(rows, key=lambda row: (row["topology"], row["params"]))


def aot_table(rows: list[dict]) -> str:
  rows = aot_order(rows)
  lines = ["| " + " | ".join(AOT_TITLES) + " |", "|" + "---|" * len(AOT_TITLES)]
  return "\n".join(lines + ["| " + " | ".join(aot_cells(row)) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__, file=sys.stderr)
    return 2
  print(markdown_table(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
