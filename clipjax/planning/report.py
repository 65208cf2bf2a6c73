"""A plan of a run on a pod: memory per chip against HBM, FLOPs, collectives, a roofline estimate
of the step time, and what the input pipeline of each host must deliver; and the largest batch
that fits (`find_batch`).

The step-time estimate is a roofline, not a measurement: the larger of
  * compute: the model FLOPs of the step per chip (`clipjax.flops`, which counts every layer of a
    scanned stack) at the chip's bf16 peak;
  * HBM: XLA's "bytes accessed" of the program at the chip's HBM bandwidth (XLA counts a loop
    body once, so with `model.unroll` > 0 it is a lower bound);
  * ICI: the bytes each chip sends per step in its collectives (`hlo.Collective.moved_bytes`,
    every run of a loop counted) at one direction of the chip's ICI bandwidth.
It assumes perfect overlap of the three and no host or input stalls; the MFU it implies is an
upper bound on what the run can reach.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from clipjax.planning.chips import GiB, Chip
from clipjax.planning.compile import CompiledStep
from clipjax.planning.hlo import COLLECTIVES, summarize

# Images per second one CPU core decodes and crops to 224 px in clipjax's input pipeline, as
# docs/data.md measures it (benchmarks/data_throughput.py, two workers on this project's 2-core
# machine: 424 per core). A TPU host's cores differ: pass --images_per_core with your own figure.
IMAGES_PER_CORE = 424.0


@dataclasses.dataclass
class Roofline:
    compute_s: float
    hbm_s: float
    ici_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        return max(
            ("compute", self.compute_s), ("HBM", self.hbm_s), ("ICI", self.ici_s), key=lambda kv: kv[1]
        )[0]

    @property
    def mfu(self) -> float:
        return self.compute_s / self.step_s if self.step_s > 0 else 0.0


def roofline(step: CompiledStep, chip: Chip, model_flops_per_chip: float) -> Roofline:
    moved = (
        sum(row["moved"] for row in summarize(step.program.collectives()).values()) if step.program else 0.0
    )
    return Roofline(
        compute_s=model_flops_per_chip / chip.peak_flops,
        hbm_s=step.bytes_accessed / chip.hbm_bandwidth,
        ici_s=moved / chip.ici_bandwidth,
    )


@dataclasses.dataclass
class Plan:
    config_name: str
    topology: str
    chip: Chip
    chips: int
    mesh: dict[str, int]
    batch_size: int
    steps: dict[str, CompiledStep]  # 'train', 'metrics', 'embed images', 'embed texts'
    model_flops_per_step: float
    images_per_core: float = IMAGES_PER_CORE

    @property
    def fits(self) -> bool:
        return all(s.fits and s.memory.total <= self.chip.hbm_bytes for s in self.steps.values())

    @property
    def model_flops_per_chip(self) -> float:
        return self.model_flops_per_step / self.chips

    def roofline(self) -> Roofline | None:
        train = self.steps.get("train")
        return roofline(train, self.chip, self.model_flops_per_chip) if train and train.fits else None

    def input_side(self) -> dict[str, float] | None:
        estimate = self.roofline()
        if estimate is None or estimate.step_s <= 0:
            return None
        hosts = max(1, self.chips // self.chip.chips_per_host)
        per_host = self.batch_size / estimate.step_s / hosts
        return {
            "hosts": hosts,
            "images_per_s_per_host": per_host,
            "cores_per_host": math.ceil(per_host / self.images_per_core),
            "host_vcpus": self.chip.host_vcpus,
        }


def plan_record(plan: Plan) -> dict:
    """The plan as plain JSON: what docs/scaling.md's tables are made from."""
    steps = {}
    for name, step in plan.steps.items():
        steps[name] = {
            "compile_s": round(step.seconds, 1),
            "fits": step.fits,
            "refusal": step.refusal,
            "required_bytes": step.required_bytes,
            "memory": dataclasses.asdict(step.memory) if step.memory else None,
            "total_bytes": step.memory.total if step.memory else None,
            "xla_flops": step.flops,
        }
    record = {
        "config": plan.config_name,
        "topology": plan.topology,
        "chips": plan.chips,
        "mesh": plan.mesh,
        "batch_size": plan.batch_size,
        "hbm_bytes": plan.chip.hbm_bytes,
        "fits": plan.fits,
        "model_flops_per_chip": plan.model_flops_per_chip,
        "steps": steps,
    }
    train = plan.steps.get("train")
    if train and train.program:
        record["collectives"] = summarize(train.program.collectives())
    estimate = plan.roofline()
    if estimate:
        record["roofline"] = {
            "compute_s": estimate.compute_s,
            "hbm_s": estimate.hbm_s,
            "ici_s": estimate.ici_s,
            "step_s": estimate.step_s,
            "bound": estimate.bound,
            "mfu": estimate.mfu,
        }
        record["input"] = plan.input_side()
    return record


def gib(n: float) -> str:
    """GiB to two decimals; MiB below a tenth of a GiB, where two decimals of a GiB say nothing."""
    if abs(n) < GiB / 10:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def _si(n: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def memory_table(plan: Plan) -> list[str]:
    names = [n for n in ("train", "metrics", "embed images", "embed texts") if n in plan.steps]
    rows = [
        ("parameters", "params"),
        ("optimizer state", "opt_state"),
        ("batch", "batch"),
        ("other state (counters, loss state)", "other_state"),
        ("argument layout padding", "layout_padding"),
        ("temporaries", "temporaries"),
        ("outputs not donated", "outputs"),
    ]
    lines = ["| per chip | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, field in rows:
        cells = [gib(getattr(plan.steps[n].memory, field)) if plan.steps[n].fits else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    totals = []
    for n in names:
        step = plan.steps[n]
        totals.append(
            f"**{gib(step.memory.total)}**" if step.fits else f"refused ({gib(step.required_bytes)} needed)"
        )
    lines.append("| **total** | " + " | ".join(totals) + " |")
    lines.append(
        f"| HBM of a {plan.chip.name} chip | " + " | ".join(gib(plan.chip.hbm_bytes) for _ in names) + " |"
    )
    lines.append("| compile time | " + " | ".join(f"{plan.steps[n].seconds:.1f} s" for n in names) + " |")
    return lines


def collectives_table(step: CompiledStep) -> list[str]:
    if not step.program:
        return []
    table = summarize(step.program.collectives())
    lines = [
        "| collective | instructions | runs per step | bytes per step (per chip) | sent per step (per chip) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind in COLLECTIVES:
        row = table.get(kind)
        if row:
            lines.append(
                f"| {kind} | {row['ops']:.0f} | {row['runs']:.0f} | {_si(row['bytes'], 'B')} | {_si(row['moved'], 'B')} |"
            )
    if len(lines) == 2:
        lines.append("| (none) | 0 | 0 | 0 B | 0 B |")
    return lines


def render(plan: Plan) -> str:
    """The plan as the text `python -m clipjax.plan` prints (markdown tables)."""
    out = [
        f"# {plan.config_name} on {plan.topology}: {plan.chips} {plan.chip.name} chips, mesh "
        + " x ".join(f"{a}={s}" for a, s in plan.mesh.items())
        + f", global batch {plan.batch_size:,} ({plan.batch_size // max(1, _batch_ways(plan)):,} per batch shard)",
        "",
        "## Memory per chip",
        "",
        *memory_table(plan),
        "",
    ]
    if plan.fits:
        out.append(
            f"**Fits**: every program stays within the {gib(plan.chip.hbm_bytes)} of HBM of a {plan.chip.name} chip."
        )
    else:
        over = [n for n, s in plan.steps.items() if not s.fits or s.memory.total > plan.chip.hbm_bytes]
        out.append(
            f"**Does not fit**: {', '.join(over)} exceed{'s' if len(over) == 1 else ''} the {gib(plan.chip.hbm_bytes)} of HBM of a {plan.chip.name} chip."
        )
    train = plan.steps.get("train")
    out += ["", "## FLOPs per chip per step", ""]
    out.append(
        f"- model FLOPs (clipjax.flops, every layer counted): {_si(plan.model_flops_per_chip, 'FLOP')}"
    )
    if train and train.fits:
        out.append(f"- XLA's count (cost_analysis; a loop body counted once): {_si(train.flops, 'FLOP')}")
        out += ["", "## Collectives of the train step", "", *collectives_table(train)]
    estimate = plan.roofline()
    if estimate:
        out += [
            "",
            "## Step time (a roofline estimate, not a measurement)",
            "",
            f"- compute: {estimate.compute_s * 1e3:.1f} ms (model FLOPs at {_si(plan.chip.peak_flops, 'FLOP/s')} bf16 peak)",
            f"- HBM: {estimate.hbm_s * 1e3:.1f} ms (XLA's bytes accessed, {_si(train.bytes_accessed, 'B')}, at {_si(plan.chip.hbm_bandwidth, 'B/s')})",
            f"- ICI: {estimate.ici_s * 1e3:.1f} ms (bytes sent in collectives at {_si(plan.chip.ici_bandwidth, 'B/s')} one way)",
            f"- estimate: {estimate.step_s * 1e3:.1f} ms per step, {estimate.bound}-bound, MFU at most {estimate.mfu:.0%} "
            "(assumes compute, memory and communication overlap perfectly and no input stalls)",
        ]
        side = plan.input_side()
        out += [
            "",
            "## Input pipeline per host",
            "",
            f"- {side['hosts']:.0f} host{'s' if side['hosts'] > 1 else ''} of {plan.chip.chips_per_host} chips: each must decode "
            f"{side['images_per_s_per_host']:,.0f} images/s at the estimated step time",
            f"- at {plan.images_per_core:.0f} images/s per core (docs/data.md, 224 px JPEGs; --images_per_core to change): "
            f"{side['cores_per_host']:.0f} cores per host, of the {side['host_vcpus']} vCPUs of a {plan.chip.name} host",
        ]
    return "\n".join(out) + "\n"


def _batch_ways(plan: Plan) -> int:
    return math.prod(s for a, s in plan.mesh.items() if a in ("data", "fsdp"))


@dataclasses.dataclass(frozen=True)
class Probe:
    """One trial batch: whether it fits, and the memory it asked for as a fraction of HBM (None
    when unknown: a config the schema refused, or a probe stored before fills were kept)."""

    fits: bool
    fill: float | None = None


def as_probe(answer) -> Probe:
    """A probe from what `fits` returned or a results file stored: a bool, a Probe or its dict."""
    if isinstance(answer, Probe):
        return answer
    if isinstance(answer, dict):
        return Probe(bool(answer["fits"]), answer.get("fill"))
    return Probe(bool(answer))


def _fill_guess(points: dict[int, Probe], low: int, high: int | None) -> float | None:
    """Where the memory reaches HBM (fill 1), on the line through the two probes nearest the
    boundary that know their fill: the memory of a train step is close to affine in the batch
    (quadratic for the gather loss's logits, which the line approaches from both sides)."""
    known = sorted((b, p.fill) for b, p in points.items() if p.fill is not None)
    under = [(b, f) for b, f in known if b <= low]
    over = [(b, f) for b, f in known if high is not None and b >= high]
    if under and over:
        (b1, f1), (b2, f2) = under[-1], over[0]
    elif len(known) >= 2:
        (b1, f1), (b2, f2) = known[-2:] if high is None else known[:2]
    else:
        return None
    if f2 <= f1 or b2 == b1:
        return None
    return b1 + (1.0 - f1) * (b2 - b1) / (f2 - f1)


def find_batch(
    fits: Callable[[int], bool | Probe],
    *,
    start: int,
    granule: int,
    resolution: int = 0,
    limit: int = 1 << 22,
    known: dict[int, bool | Probe] | None = None,
    log=print,
) -> int:
    """The largest per-shard batch (a multiple of `granule`) for which `fits` holds; 0 if not
    even `granule` fits. With `resolution`, the search stops once the bracket is within
    1/`resolution` of the batch found (each probe is a compile of minutes, and at large batches
    a granule of the start would cost many more). `known`: probes done before (a resumed search).

    Without fills (`fits` returns bools) it doubles from `start` until a batch fails, then
    bisects. When `fits` returns Probes with their fill, the next batch is where the line through
    the probes nearest the boundary reaches HBM, held inside the bracket (at least an eighth of
    it from either end, at most 64x the largest fitting batch before one fails), and a guess
    within the tolerance of an end probes the batch that closes the bracket: an affine memory
    takes two probes after the first two."""
    start = max(granule, start // granule * granule)
    points = {int(b): as_probe(p) for b, p in (known or {}).items()}

    def check(b: int) -> bool:
        if b not in points:
            points[b] = as_probe(fits(b))
            fill = points[b].fill
            log(
                f"  per-shard batch {b:,}: {'fits' if points[b].fits else 'does not fit'}"
                + (f" ({fill:.0%} of HBM)" if fill is not None else "")
            )
        return points[b].fits

    def bracket() -> tuple[int, int | None]:
        low = max((b for b, p in points.items() if p.fits), default=0)
        high = min((b for b, p in points.items() if not p.fits and b > low), default=None)
        return low, high

    def down(x: float) -> int:
        return int(x) // granule * granule

    if not points:
        check(start)
    while True:
        low, high = bracket()
        tolerance = max(granule, low // resolution if resolution else 0)
        if high is not None and high - low <= tolerance:
            return low
        if low >= limit:
            return low
        guess = _fill_guess(points, low, high)
        if high is None:  # nothing refused yet: grow
            nxt = low * 2 if guess is None else min(max(down(guess), low + tolerance), low * 64)
            nxt = min(nxt, limit // granule * granule)
        elif low == 0:  # nothing fits yet: shrink
            nxt = down(high / 2) if guess is None else max(down(guess), down(high / 8))
            if nxt < granule:
                return granule if check(granule) else 0
        else:
            span = high - low
            if guess is None:
                nxt = down((low + high) / 2)
            else:
                nxt = min(max(down(guess), down(low + span / 8)), down(high - span / 8))
                # A guess at an end of the bracket closes it: probe the batch one tolerance in.
                if nxt <= low + tolerance:
                    nxt = down(low + tolerance)
                elif nxt >= high - tolerance:
                    nxt = down(high - tolerance)

        def untried(b: int) -> bool:
            return b > low and (high is None or b < high) and b not in points

        if not untried(nxt):
            nxt = low * 2 if high is None else down((low + high) / 2)
            if not untried(nxt):
                return low
        check(nxt)
