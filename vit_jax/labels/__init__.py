"""Class names of the ImageNet heads, in the class order of the official checkpoints.

`imagenet1k.txt` (1000 classes) and `imagenet21k.txt` (21,843 classes, Google's
ImageNet-21k order) hold `<synset>\t<lemmas>` per line; `build_labels.py`
regenerates them.
"""
from __future__ import annotations

import pathlib

_FILES = {1000: "imagenet1k.txt", 21843: "imagenet21k.txt"}


def read_label_file(path: str | pathlib.Path) -> list[str]:
  """One class per line; a leading `<synset>\\t` is kept out of the name."""
  lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
  return [line.split("\t", 1)[-1] for line in lines if line.strip()]


def class_names(num_classes: int) -> list[str] | None:
  """ImageNet-1k / -21k class names for a head of 1000 / 21843 classes, else None."""
  name = _FILES.get(num_classes)
  return None if name is None else read_label_file(pathlib.Path(__file__).parent / name)
