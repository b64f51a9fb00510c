"""Small helpers the command-line entry points share (predict, bench)."""
from __future__ import annotations

import ast
from typing import Any, Iterable


def parse_key_values(items: Iterable[str], what: str) -> dict[str, Any]:
  """`["depth=2", "classifier=gap", ...]` -> `{"depth": 2, "classifier": "gap"}`.

  Values are Python literals (ints, floats, bools, tuples, None) or else plain
  strings.  `what` names the option in the error, e.g. "--model-option":
  an item without `=` or without a key raises ValueError.
  """
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"{what} expects KEY=VALUE (e.g. {what} hidden_size=64), got {item!r}.")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # a plain string, e.g. classifier=gap
  return out
