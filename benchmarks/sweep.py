"""Runs every configuration of a JSON-lines file with `python -m vit_jax.bench`, each in a fresh process
(clean device memory and compile caches).

  python benchmarks/sweep.py [--configs benchmarks/sweep.jsonl] [--out FILE] [--dry-run] [BENCH FLAGS ...]
  python benchmarks/sweep.py --vs timm --out benchmarks/results/h100.jsonl      # the README table

Each line of the configurations file is one run: bench flags without the leading `--` ("_" for "-"),
true for a switch, a list for a repeated flag, e.g.
  {"model": "ViT-L_16", "mode": "train", "batch": 64, "scan": true, "remat": true, "set": ["depth=2"]}
Lines starting with # are comments. BENCH FLAGS (e.g. --vs timm --steps 10) go to every run, before the
line's own flags (which therefore win). Each run prints its JSON line and appends it to --out; a run that
fails adds the line {...its configuration, "error": "exit N (see stderr above)"} instead, and the sweep
goes on (exit status 1 at the end). --dry-run prints the commands only.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from vit_jax.bench import emit

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = REPO_ROOT / "benchmarks" / "sweep.jsonl"


def read_configs(path) -> list[dict[str, Any]]:
  lines = pathlib.Path(path).read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def args_to_argv(entry: dict[str, Any]) -> list[str]:
  """A configuration {"model": ..., "remat": true, "set": [...]} -> bench command-line flags."""
  argv = []
  for key, value in entry.items():
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
      if value:
        argv.append(flag)
    elif isinstance(value, list):
      for item in value:
        argv += [flag, str(item)]
    elif value is not None:
      argv += [flag, str(value)]
  return argv


def commands(configs: list[dict[str, Any]], bench_flags: list[str], out: str | None) -> list[list[str]]:
  shared = list(bench_flags) + (["--out", out] if out else [])
  return [[sys.executable, "-m", "vit_jax.bench", *shared, *args_to_argv(entry)] for entry in configs]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/sweep.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Any other flag goes to every `python -m vit_jax.bench` run.")
  p.add_argument("--configs", default=str(DEFAULT_CONFIGS), help="JSON-lines file (default: %(default)s)")
  p.add_argument("--out", default=None, help="append every run's JSON line to this file")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args, bench_flags = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  configs = read_configs(args.configs)
  cmds = commands(configs, bench_flags, args.out)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
  failures = 0
  for i, (entry, cmd) in enumerate(zip(configs, cmds)):
    shown = "python " + " ".join(cmd[1:])
    if args.dry_run:
      print(shown)
      continue
    print(f"[sweep] {i + 1}/{len(cmds)}: {shown}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
      failures += 1
      emit({**entry, "error": f"exit {proc.returncode} (see stderr above)"}, args.out)
    else:
      sys.stdout.write(proc.stdout)
      sys.stdout.flush()
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
