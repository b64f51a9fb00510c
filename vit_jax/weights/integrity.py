"""Broken and hostile weights files: one clear error, in bounded time and memory, never a partial load.

`read_checked(path, fmt, read)` runs the format's checks, then `read(path)`; whatever goes wrong
becomes `UnreadableWeightsError` naming the file and what is wrong with it:

  every format   missing file, a directory where a file is expected, an empty file
  .safetensors   the header is checked before anything is allocated: its length against the file, valid
                 JSON, known dtypes, non-negative shapes, and for every tensor offsets inside the data
                 whose length equals shape x item size (a header claiming a 10^12-element tensor is
                 refused here); tensors may not overlap
  .npz           a complete zip archive; every member's .npy header is read first: no Python objects
                 (pickles are refused: allow_pickle=False), and the shape it claims must be exactly the
                 bytes the member holds; no member may inflate more than deflate can (zip bombs); the
                 zip CRC of every member is checked while it is read
  .pth / .bin    read with `torch.load(weights_only=True)` (a pickled callable or any other code is
                 refused); the zip CRC of every record is checked first (PyTorch itself does not), in
                 chunks
  TF checkpoint  the index is read first, and no tensor may claim more bytes than the data files hold
                 (TF allocates a tensor before reading it); TF checks its own CRC32C while reading

What no check can see: a flipped bit inside the data of a .safetensors file (the format has no
checksum) gives other values, not an error; files downloaded through the catalogue are checked
against their published sha256 (`weights/hub.py`).
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Callable

import numpy as np

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit for its JSON header
DEFLATE_MAX_RATIO = 1032  # the most deflate can inflate a stream (zip bombs claim more)
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class UnreadableWeightsError(ValueError):
  """A weights file is truncated, corrupt, inconsistent with itself, or holds code (a pickle)."""


def _fail(path: str, what: str) -> UnreadableWeightsError:
  return UnreadableWeightsError(f"cannot read weights file {path!r}: {what.rstrip('.?')}. Nothing was loaded; "
                                "download or export the file again.")


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def check_file(path: str, fmt: str) -> None:
  """A regular, non-empty file."""
  if os.path.isdir(path):
    raise _fail(path, f"it is a directory, but a {fmt} file was expected")
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  if os.path.getsize(path) == 0:
    raise _fail(path, "the file is empty (0 bytes; an interrupted download or copy)")


def check_safetensors(path: str) -> None:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _fail(path, f"the file has {size} bytes, too few for a safetensors header")
    n = int.from_bytes(head, "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
      raise _fail(path, f"the header claims {n} bytes, but the file has {size - 8} after the length field "
                        "(truncated, or not a safetensors file)")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, ValueError) as e:
    raise _fail(path, f"the header is not valid JSON ({e}): the file is corrupt") from None
  if not isinstance(header, dict):
    raise _fail(path, "the header is not a JSON object")
  data = size - 8 - n
  spans = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
      raise _fail(path, f"the header entry of tensor {name!r} is malformed: {str(info)[:200]}")
    shape, (begin, end) = info["shape"], info["data_offsets"]
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
      raise _fail(path, f"tensor {name!r} has a malformed shape {shape} or offsets {info['data_offsets']}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]]
    if not 0 <= begin <= end <= data:
      raise _fail(path, f"tensor {name!r} claims bytes [{begin}, {end}) of a data section of {data} bytes "
                        "(truncated, or a header that lies)")
    if end - begin != nbytes:
      raise _fail(path, f"tensor {name!r} claims shape {shape} ({info['dtype']}, {nbytes} bytes) but spans "
                        f"{end - begin} bytes: the header lies about its shape or offsets")
    spans.append((begin, end, name))
  spans.sort()
  for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise _fail(path, f"tensors {n0!r} and {n1!r} overlap in the file: the header lies about their offsets")


def _open_zip(path: str, what: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise _fail(path, f"it is not a complete zip archive ({e}): truncated or corrupt {what}") from None


def _check_member_sizes(path: str, info: zipfile.ZipInfo, size: int, kind: str) -> None:
  """The sizes a zip directory entry claims, checked before any byte of it is read or inflated."""
  if info.compress_size > size:
    raise _fail(path, f"{kind} {info.filename!r} claims {info.compress_size} bytes, more than the whole file "
                      f"({size}): truncated, or a directory that lies")
  if info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_MAX_RATIO * max(info.compress_size, 1):
    raise _fail(path, f"{kind} {info.filename!r} claims to inflate {info.compress_size} bytes to "
                      f"{info.file_size}, more than deflate can (a zip bomb?)")


def check_npz(path: str) -> None:
  size = os.path.getsize(path)
  with _open_zip(path, ".npz") as archive:
    for info in archive.infolist():
      _check_member_sizes(path, info, size, "member")
      if not info.filename.endswith(".npy"):
        continue
      try:
        with archive.open(info) as f:
          version = np.lib.format.read_magic(f)
          read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read_header(f)
          offset = f.tell()
      except zipfile.BadZipFile as e:
        raise _fail(path, f"member {info.filename!r} is corrupt ({e})") from None
      except ValueError as e:
        raise _fail(path, f"member {info.filename!r} has no valid .npy header ({e})") from None
      if dtype.hasobject:
        raise _fail(path, f"member {info.filename!r} holds pickled Python objects (dtype {dtype}), which are never "
                          "loaded (allow_pickle=False: a pickle can run code)")
      nbytes = math.prod(shape) * dtype.itemsize
      if offset + nbytes != info.file_size:
        raise _fail(path, f"member {info.filename!r} claims shape {shape} ({dtype}, {nbytes} bytes) but holds "
                          f"{info.file_size - offset} bytes of data: truncated, or a header that lies")


def check_zip_crcs(path: str) -> None:
  """Every member of a zip archive (a PyTorch file) read through in chunks against its CRC-32."""
  size = os.path.getsize(path)
  with _open_zip(path, "PyTorch file") as archive:
    for info in archive.infolist():
      _check_member_sizes(path, info, size, "record")
      try:
        with archive.open(info) as f:
          while f.read(1 << 22):
            pass
      except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _fail(path, f"record {info.filename!r} is corrupt or truncated ({_first_line(e)})") from None


def check_tf(prefix: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = prefix + ".index"
  check_file(index, "TF checkpoint index (.index)")
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
  except Exception as e:  # pylint: disable=broad-except
    raise _fail(index, f"the TF checkpoint index cannot be read ({_first_line(e)})") from None
  folder, base = os.path.split(prefix)
  shards = [os.path.join(folder or ".", n) for n in os.listdir(folder or ".") if n.startswith(base + ".data-")]
  for shard in shards:
    check_file(shard, "TF checkpoint data shard")
  held = sum(os.path.getsize(s) for s in shards)
  for name, shape in shapes.items():
    dtype = dtypes[name]
    if dtype == tf.string:
      continue
    nbytes = math.prod(shape) * dtype.size
    if nbytes > held:
      raise _fail(prefix, f"the index claims tensor {name!r} of shape {shape} ({nbytes} bytes), but the data files "
                          f"hold {held} bytes: the index lies, or the data is truncated")


def read_checked(path: str, fmt: str, read: Callable[[str], dict]) -> dict:
  """`read(path)` behind the checks of `fmt` ('npz', 'safetensors', 'torch', 'tf'); any failure of a file
  that passed them is still one UnreadableWeightsError naming the file."""
  if fmt == "tf":
    check_tf(path)
  else:
    check_file(path, {"npz": ".npz", "safetensors": ".safetensors", "torch": "PyTorch (.pth/.pt/.bin)"}[fmt])
    if fmt == "safetensors":
      check_safetensors(path)
    elif fmt == "npz":
      check_npz(path)
    elif fmt == "torch":
      with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # PyTorch >= 1.6 writes zip archives; older files are pickles
      if is_zip:
        check_zip_crcs(path)
  try:
    return read(path)
  except (UnreadableWeightsError, ImportError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text or "Unsupported global" in text:
      what = ("it holds pickled code or objects other than tensors (a pickled callable?), which are never run "
              "(torch.load(weights_only=True)); if you trust the file, load it yourself and pass the state_dict")
    else:
      what = f"it is corrupt or truncated ({_first_line(e)})"
    raise _fail(path, what) from e
