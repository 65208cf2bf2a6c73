"""Reading a compiled program's text (`compiled.as_text()`): its collectives, how often each runs
per step, and the shapes of its buffers.

Why parse text: the TPU executable is only available as HLO text from a host without a TPU, and
XLA's `cost_analysis()` counts the body of a loop once (a scanned layer stack is a loop). Here
every instruction is weighted by how many times its computation runs: a `while` body runs its
trip count times (read from the loop's `known_trip_count`, or else from the constant its
condition compares the counter against), and computations called from it inherit that count.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# Bytes per element of the HLO element types that appear in these programs.
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.dims)


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shape: str  # the result shape as written (an array or a tuple)
    rest: str  # operands and attributes
    computation: str

    def arrays(self) -> list[Array]:
        return [Array(m.group(1), _dims(m.group(2))) for m in _ARRAY.finditer(self.shape)]


@dataclasses.dataclass
class Collective:
    """One collective of the program, weighted by how often it runs in a step."""

    kind: str  # one of COLLECTIVES
    name: str
    bytes: int  # of the whole array it gathers, reduces or sends (per chip, per run)
    group: int  # participants in each group (1 where unknown)
    runs: int  # times per step
    op_name: str  # the JAX operation it came from (metadata), for the reader

    @property
    def moved_bytes(self) -> float:
        """Bytes leaving each chip per run, by the standard ring algorithms: all-gather and
        reduce-scatter move (n-1)/n of the full array, all-reduce twice that, all-to-all
        (n-1)/n, a collective-permute the whole buffer."""
        n = max(self.group, 1)
        share = (n - 1) / n
        if self.kind == "all-reduce":
            return 2 * share * self.bytes
        if self.kind == "collective-permute":
            return float(self.bytes)
        return share * self.bytes


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


class Program:
    """The computations and instructions of one HLO module's text."""

    def __init__(self, text: str):
        self.text = text
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header and not line.startswith(" "):
                current = header.group(2)
                self.computations[current] = []
                if header.group(1):
                    self.entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
            if current is None:
                continue
            match = _INSTRUCTION.match(line)
            if match:
                name, shape, opcode, rest = match.groups()
                self.computations[current].append(Instruction(name, opcode, shape, rest, current))
        self.runs = self._runs()
        self._collectives: list[Collective] | None = None

    def instructions(self):
        for body in self.computations.values():
            yield from body

    def _trip_count(self, instruction: Instruction) -> int:
        found = _TRIP_COUNT.search(instruction.rest)
        if found:
            return int(found.group(1))
        condition = re.search(r"condition=%?([\w.\-]+)", instruction.rest)
        constants = [
            int(c)
            for i in self.computations.get(condition.group(1) if condition else "", [])
            if i.opcode == "constant"
            for c in re.findall(r"^(-?\d+)\)", i.rest)
        ]
        positive = [c for c in constants if c > 0]
        return max(positive) if positive else 1

    def _runs(self) -> dict[str, int]:
        """How many times each computation runs when the entry computation runs once."""
        calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        for caller, body in self.computations.items():
            for instruction in body:
                trips = self._trip_count(instruction) if instruction.opcode == "while" else 1
                names = _CALLEE.findall(instruction.rest)
                for group in _CALLEE_LIST.findall(instruction.rest):
                    names += [n.strip().lstrip("%") for n in group.split(",")]
                for callee in names:
                    if callee in self.computations:
                        # A loop's condition runs once more than its body; that is noise here.
                        calls[caller].append((callee, trips))
        runs: dict[str, int] = collections.defaultdict(int)
        order = self._topological(calls)
        runs[self.entry] = 1
        for caller in order:
            for callee, trips in calls.get(caller, ()):
                runs[callee] += runs[caller] * trips
        return dict(runs)

    def _topological(self, calls) -> list[str]:
        seen, order = set(), []

        def visit(name):
            if name in seen:
                return
            seen.add(name)
            for callee, _ in calls.get(name, ()):
                visit(callee)
            order.append(name)

        visit(self.entry)
        return order[::-1]

    def collectives(self) -> list[Collective]:
        """Every collective that runs, with its size and runs per step (async pairs counted once,
        at their start). Read once: the plan's tables, roofline and record all ask for them."""
        if self._collectives is None:
            self._collectives = self._read_collectives()
        return self._collectives

    def _read_collectives(self) -> list[Collective]:
        found = []
        for instruction in self.instructions():
            kind = instruction.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or instruction.opcode.endswith("-done"):
                continue
            runs = self.runs.get(instruction.computation, 0)
            if not runs:
                continue
            arrays = instruction.arrays()
            if not arrays:
                continue
            if instruction.opcode.endswith("-start") and kind != "all-reduce" and len(arrays) >= 2:
                result = arrays[1]  # (operand, result, context...) of an async collective
            elif kind == "all-reduce" or kind == "all-to-all":
                result = None  # a tuple of reduced arrays: all of them move
            else:
                result = arrays[0]
            size = sum(a.bytes for a in arrays) if result is None else result.bytes
            group = _group_size(instruction.rest)
            if kind == "reduce-scatter":
                size *= group  # the full array reduced, of which each chip keeps 1/n
            meta = re.search(r'op_name="([^"]*)"', instruction.rest)
            found.append(Collective(kind, instruction.name, size, group, runs, meta.group(1) if meta else ""))
        return found


def _group_size(attributes: str) -> int:
    """Participants per replica group, in any of the forms XLA prints."""
    # mesh['a'=1,'b'=2], device_ids=(...) {'b'}: the named axes of an iota mesh, possibly permuted.
    mesh = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\([^)]*\)[^{]*)?\s*\{([^}]*)\}", attributes
    )
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        names = re.findall(r"'([^']+)'", mesh.group(2))
        return math.prod(int(sizes[n]) for n in names if n in sizes) or 1
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
    if listed:
        return len([d for d in listed.group(1).split(",") if d])
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    if pairs:
        return 2
    return 1


def summarize(collectives: list[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: instructions, runs per step, bytes produced per step, bytes moved per step."""
    table: dict[str, dict[str, float]] = {}
    for c in collectives:
        row = table.setdefault(c.kind, {"ops": 0, "runs": 0, "bytes": 0.0, "moved": 0.0})
        row["ops"] += 1
        row["runs"] += c.runs
        row["bytes"] += c.bytes * c.runs
        row["moved"] += c.moved_bytes * c.runs
    return table
