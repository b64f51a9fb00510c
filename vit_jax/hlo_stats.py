"""What an optimised XLA program does, read off its HLO text (`compiled.as_text()`), with loops counted.

XLA's `cost_analysis()` counts the body of a `while` loop (a scanned layer stack, a gradient-accumulation
scan) once, whatever its trip count, so for a model with `scan=True` its FLOPs are about 1/depth of the
truth.  Here every computation gets a multiplicity: the number of times one run of the program executes
it (a while body: its caller's times the trip count, read from the loop condition's `i < N` constant),
and three things are summed with it:

  matmul FLOPs   2 x MACs of every `dot` and `convolution` (padding taps excluded), as `vit_jax.flops` counts
                 the model (so recomputation under remat shows up as a ratio above 1)
  HBM bytes      operands + results of the instructions of non-fused computations whose arrays live in
                 HBM (memory space 0), as XLA's own bytes-accessed estimate does per fusion: an estimate
  collectives    all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute: count and result
                 bytes per device, the group size, and whether a while loop (the layer loop) runs them
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_CALLEE = re.compile(r"\b(calls|body|to_apply|condition)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}


@dataclasses.dataclass
class Instruction:
  name: str
  type: str  # result type text, e.g. 'bf16[8,197,768]{2,1,0:T(8,128)(2,1)}' or a tuple '(..., ...)'
  opcode: str
  operands: list[str]
  attributes: str
  computation: str
  inside: str = ""  # the text between the opcode's parentheses (a parameter's index, a constant's value)


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int  # result bytes per device (per execution)
  group: int  # devices taking part in one group
  count: int  # executions per program run (multiplicity)
  in_loop: bool


@dataclasses.dataclass
class Stats:
  matmul_flops: float  # per device, loops counted
  matmul_flops_once: float  # per device, every loop body once (as cost_analysis counts)
  hbm_bytes: float
  hbm_bytes_once: float
  collectives: list[Collective]
  loops: list[tuple[str, int]]  # (while body, trip count)

  def collective_summary(self) -> dict[str, dict[str, float]]:
    """{kind: {count, bytes, count_in_loop, bytes_in_loop}} per program run (bytes: results per device)."""
    out = {k: {"count": 0, "bytes": 0, "count_in_loop": 0, "bytes_in_loop": 0} for k in COLLECTIVES}
    for c in self.collectives:
      row = out[c.kind]
      row["count"] += c.count
      row["bytes"] += c.count * c.bytes
      if c.in_loop:
        row["count_in_loop"] += c.count
        row["bytes_in_loop"] += c.count * c.bytes
    return out


def _split_type(rest: str) -> tuple[str, str]:
  """('result type', 'opcode(...) attributes') of the text after '='."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...], int]]:
  """(dtype, shape, memory space) of each array in a (tuple) type."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if dtype not in _BYTES:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return out


def _nbytes(type_text: str, hbm_only: bool = False) -> int:
  return sum(_BYTES[d] * math.prod(s) for d, s, space in _arrays(type_text) if not hbm_only or space == 0)


def parse(text: str) -> dict[str, list[Instruction]]:
  """{computation name: instructions}; the entry computation is also under '__entry__'."""
  comps: dict[str, list[Instruction]] = {}
  current = None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        comps["__entry__"] = comps[current]
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    type_text, call = _split_type(m.group(2))
    opcode, _, args = call.partition("(")
    depth, i = 1, 0
    while i < len(args) and depth:
      depth += args[i] == "("
      depth -= args[i] == ")"
      i += 1
    operands = re.findall(r"%([^\s,)]+)", args[:i - 1])
    comps[current].append(Instruction(m.group(1), type_text, opcode.strip(), operands, args[i:], current,
                                      args[:i - 1]))
  return comps


def _constant_values(text: str) -> dict[str, int]:
  return {m.group(1): int(m.group(2)) for m in re.finditer(r"%(\S+) = s(?:32|64)\[\]\S* constant\((-?\d+)\)", text)}


def multiplicities(comps: dict[str, list[Instruction]], text: str) -> tuple[dict[str, float], set[str], list]:
  """({computation: executions per program run}, computations run inside a while loop, [(body, trips)])."""
  constants = _constant_values(text)
  mult: dict[str, float] = {}
  in_loop: set[str] = set()
  loops = []

  def visit(name: str, times: float, looped: bool, stack: tuple = ()):
    if name not in comps or name in stack:
      return
    mult[name] = mult.get(name, 0) + times
    if looped:
      in_loop.add(name)
    for ins in comps[name]:
      callees = dict((k, v) for k, v in _CALLEE.findall(ins.attributes))
      if ins.opcode == "while":
        cond = callees.get("condition")
        trips = max((constants.get(o.name, 1) for o in comps.get(cond, []) if o.opcode == "constant"), default=1)
        trips = max(trips, max((constants.get(op, 1) for o in comps.get(cond, []) for op in o.operands
                                if op in constants), default=1))
        loops.append((callees.get("body"), trips))
        visit(callees.get("body"), times * trips, True, stack + (name,))
        continue
      for key, callee in _CALLEE.findall(ins.attributes):
        if key in ("calls",):
          visit(callee, times, looped, stack + (name,))
      for branches in _BRANCHES.findall(ins.attributes):
        for callee in re.findall(r"%([^\s,}]+)", branches):
          visit(callee, times, looped, stack + (name,))
  entry = next(k for k, v in comps.items() if k != "__entry__" and v is comps["__entry__"])
  visit(entry, 1.0, False)
  return mult, in_loop, loops


def _dims(labels: str) -> dict[str, int]:
  return {ch: i for i, ch in enumerate(labels)}


def _valid_taps(n: int, k: int, o: int, stride: int = 1, lo: int = 0, lhs_dilate: int = 1,
                rhs_dilate: int = 1) -> int:
  """Window taps that land on an input element (not on padding or a dilation hole), summed over the `o`
  output positions of one spatial dim (TPU HLO writes batched matmuls as dilated convolutions)."""
  if k * o > 5e7:  # too many to enumerate: the dense count
    return k * o
  pos = np.arange(o)[:, None] * stride + np.arange(k)[None, :] * rhs_dilate - lo
  valid = (pos >= 0) & (pos <= (n - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
  return int(valid.sum())


def _conv_macs(ins: Instruction, shapes: dict[str, tuple]) -> int:
  out = _arrays(ins.type)
  if not out or len(ins.operands) < 2:
    return 0
  out_shape = out[0][1]
  lhs, rhs = shapes.get(ins.operands[0]), shapes.get(ins.operands[1])
  labels = re.search(r"dim_labels=([^_\s,]+)_([^-\s,]+)->([^\s,]+)", ins.attributes)
  if lhs is None or rhs is None or not labels:
    return 0
  lhs_l, rhs_l, out_l = labels.groups()
  rd, ld, od = _dims(rhs_l), _dims(lhs_l), _dims(out_l)
  in_features = rhs[rd["i"]]
  spatial = sorted(ch for ch in rhs_l if ch not in "io")  # the window lists spatial dims 0, 1, ... in order
  window = re.search(r"window=\{([^}]*)\}", ins.attributes)
  win = window.group(1) if window else ""

  def option(key, default, j):
    m = re.search(key + r"=([0-9_x-]+)", win)
    return m.group(1).split("x")[j] if m else default

  # MACs = output batch x output features x input features (per group: the kernel's 'i') x valid taps.
  batch_points = math.prod(out_shape[od[ch]] for ch in out_l if not ch.isdigit())
  taps = 1
  for j, ch in enumerate(spatial):
    lo = int(option("pad", "0_0", j).split("_")[0])
    taps *= _valid_taps(lhs[ld[ch]], rhs[rd[ch]], out_shape[od[ch]], int(option("stride", 1, j)), lo,
                        int(option("lhs_dilate", 1, j)), int(option("rhs_dilate", 1, j)))
  return batch_points * in_features * taps


def _dot_macs(ins: Instruction, shapes: dict[str, tuple]) -> int:
  out = _arrays(ins.type)
  lhs = shapes.get(ins.operands[0]) if ins.operands else None
  contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attributes)
  if not out or lhs is None:
    return 0
  dims = [int(d) for d in contract.group(1).split(",") if d] if contract else []
  return math.prod(out[0][1]) * math.prod(lhs[d] for d in dims)


def _group_size(attributes: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
    names = re.findall(r"'([\w]+)'", m.group(2))
    return math.prod(sizes.get(n, 1) for n in names) or 1
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attributes)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"source_target_pairs=\{([^}]*)\}\}", attributes)
  return 2 if m else num_devices


def _param_traffic(comps: dict[str, list[Instruction]], types: dict[str, str], body: str, value: str,
                   depth: int = 0) -> tuple[int, int, bool] | None:
  """How a fusion body uses the buffer `value` (a parameter, or what aliases it): (bytes read, bytes written
  into it in place, whether it flows on to the output in place), or None when some use reads it whole.

  Slicing uses: a dynamic-slice reads its slice; a dynamic-update-slice writes its update into the buffer
  (XLA updates in place); a bitcast or a nested fusion is followed; the root tuple passes it through."""
  if depth > 8:
    return None
  read = written = 0
  in_place = False
  for ins in comps.get(body, []):
    for position, operand in enumerate(ins.operands):
      if operand != value:
        continue
      if ins.opcode == "dynamic-slice" and position == 0:
        read += _nbytes(ins.type)
        continue
      if ins.opcode == "tuple":
        in_place = True
        continue
      if ins.opcode == "dynamic-update-slice" and position == 0:
        written += _nbytes(types.get(ins.operands[1], "")) if len(ins.operands) > 1 else 0
        in_place = True
        follow = _param_traffic(comps, types, body, ins.name, depth + 1)
      elif ins.opcode == "bitcast":
        follow = _param_traffic(comps, types, body, ins.name, depth + 1)
      elif ins.opcode == "fusion":
        callee = dict(_CALLEE.findall(ins.attributes)).get("calls")
        inner = next((i.name for i in comps.get(callee, []) if i.opcode == "parameter"
                      and i.inside.strip() == str(position)), None)
        follow = _param_traffic(comps, types, callee, inner, depth + 1) if inner else None
      else:
        return None
      if follow is None:
        return None
      read, written, in_place = read + follow[0], written + follow[1], in_place or follow[2]
  return read, written, in_place


def _moved_bytes(ins: Instruction, types: dict[str, str], comps: dict[str, list[Instruction]]) -> int:
  """HBM bytes one top-level instruction reads and writes.  A loop reads one layer of a stacked array
  ([depth, ...] weights, saved activations) with a dynamic-slice and writes one with an in-place
  dynamic-update-slice, also from fusions nested in fusions: those count the slice, not the whole stack
  (else a 48-layer loop would count its stacks 48 times over).  An async start (copy-start, slice-start, ...)
  returns an alias of its operand first: that is no write."""
  operand_bytes = [_nbytes(types.get(o, ""), True) for o in ins.operands]
  written = _nbytes(ins.type, True)
  if ins.opcode.endswith("-start") and ins.type.startswith("("):
    arrays = _arrays(ins.type)
    aliased = sum(len(_arrays(types.get(o, ""))) for o in ins.operands)
    written = sum(_BYTES[d] * math.prod(shape) for d, shape, space in arrays[aliased:] if space == 0)
    if ins.opcode == "slice-start" and operand_bytes and len(arrays) > aliased:
      d, shape, _ = arrays[aliased]
      operand_bytes[0] = min(operand_bytes[0], _BYTES[d] * math.prod(shape))  # the slice is read
  callee = dict(_CALLEE.findall(ins.attributes)).get("calls") if ins.opcode == "fusion" else None
  body = comps.get(callee) if callee else None
  if ins.opcode == "dynamic-slice" and operand_bytes:
    operand_bytes[0] = written
  elif ins.opcode == "dynamic-update-slice" and len(operand_bytes) > 1:
    operand_bytes[0], written = 0, operand_bytes[1]
  elif body:
    params = {i.name: int(i.inside) for i in body if i.opcode == "parameter" and i.inside.strip().isdigit()}
    for pname, index in params.items():
      if index >= len(operand_bytes) or not operand_bytes[index]:  # not in HBM (e.g. VMEM, S(1))
        continue
      traffic = _param_traffic(comps, types, callee, pname)
      if traffic is None:
        continue
      read, update, in_place = traffic
      if in_place:  # the output holds this buffer, updated where it was: only the update is written
        written = max(written - operand_bytes[index], 0) + update
      operand_bytes[index] = min(operand_bytes[index], read)
  return written + sum(operand_bytes)


def analyse(text: str, num_devices: int) -> Stats:
  comps = parse(text)
  mult, in_loop, loops = multiplicities(comps, text)
  shapes = {}
  for instructions in comps.values():
    for ins in instructions:
      arrays = _arrays(ins.type)
      if arrays:
        shapes[ins.name] = arrays[0][1]
  types = {ins.name: ins.type for instructions in comps.values() for ins in instructions}
  # Computations executed as such (not fusion bodies): their instructions move data through HBM.
  fused = {c for instructions in comps.values() for ins in instructions if ins.opcode in ("fusion",)
           for k, c in _CALLEE.findall(ins.attributes) if k == "calls"}
  flops = flops_once = hbm = hbm_once = 0.0
  collectives = []
  seen = set()  # an async collective's start/update/done fusions each hold a copy of it (same channel_id)
  for name, instructions in comps.items():
    if name == "__entry__" or name not in mult:
      continue
    times = mult[name]
    for ins in instructions:
      macs = 0
      if ins.opcode == "convolution":
        macs = _conv_macs(ins, shapes)
      elif ins.opcode == "dot":
        macs = _dot_macs(ins, shapes)
      flops += 2 * macs * times
      flops_once += 2 * macs
      if name not in fused and ins.opcode not in _NO_TRAFFIC and not ins.opcode.endswith("-done"):
        moved = _moved_bytes(ins, types, comps)
        hbm += moved * times
        hbm_once += moved
      kind = ins.opcode.removesuffix("-start")
      channel = re.search(r"channel_id=(\d+)", ins.attributes)
      if kind in COLLECTIVES and channel:
        key = (channel.group(1), times, name in in_loop)
        if key in seen:
          continue
        seen.add(key)
      if kind in COLLECTIVES:
        arrays = _arrays(ins.type)
        # collective-permute-start / all-gather-start return (operand, result, context scalars...).
        paired = ins.opcode in ("collective-permute-start", "all-gather-start")
        result = arrays[1] if paired and len(arrays) > 1 else None
        size = _BYTES[result[0]] * math.prod(result[1]) if result else _nbytes(ins.type)
        collectives.append(Collective(kind, size, _group_size(ins.attributes, num_devices), int(times),
                                      name in in_loop))
  return Stats(flops, flops_once, hbm, hbm_once, collectives, loops)
