"""docs/scaling.md from the TPU compiler: every shipped config on its pod, and the batch frontier.

    python benchmarks/scaling.py                      # every row not yet in the results, then the doc
    python benchmarks/scaling.py --only clip_vit_b16  # rows whose config name contains this
    python benchmarks/scaling.py --pod_scale          # only B/32 at 4,096 on 8 and 64 v5p chips
    python benchmarks/scaling.py --frontier           # also the largest-batch table (many compiles)
    python benchmarks/scaling.py --markdown           # rewrite docs/scaling.md from stored results

Each shipped config names the pod it is meant for in its docstring (a line `Pod: v5p:4x4x4 ...`).
For each, `clipjax.planning.planner.build_plan` compiles the real train step, the metrics step
and the evaluation encoders for that topology (libtpu's deviceless compiler: no TPU needed) and
records memory per chip, fit, FLOPs, collectives, the roofline estimate and compile times in
benchmarks/results/scaling.json. Rows already there are kept (the compiles take minutes each on
a 2-core host); `--redo` recompiles them. The frontier rows search the largest global batch of
CLIP B/16 that fits each topology with the ring loss and with the gather loss, as shipped and
with micro-batches of 128 examples per chip (GradCache: the towers hold one micro-batch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipjax.cli import load_config_file  # noqa: E402
from clipjax.config import apply_overrides  # noqa: E402
from clipjax.planning.report import as_probe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
DOC = ROOT / "docs" / "scaling.md"
# The shipped configs that train at scale (the demos run on a CPU: docs/configs.md).
SHIPPED = (
    "clip_vit_b32.py",
    "clip_vit_b16.py",
    "clip_vit_l14.py",
    "siglip_vit_b16.py",
    "siglip_so400m14.py",
    "simclr_imagenet.py",
    "lit_demo.py",
    "coca_demo.py",
    "coca_vit_b32.py",
    "locca_demo.py",
    "siglip2_demo.py",
    "siglip2_vit_b16.py",
    "siglip2_naflex_vit_b16.py",
)
# Configs also compiled on a pod other than their own, to show why their docstring names theirs.
EXTRA_ROWS = (("clip_vit_l14.py", "v5p:4x4x8"), ("siglip_so400m14.py", "v5p:4x4x8"))
# Vocabulary sizes of tokenizers whose files live in the user's bucket.
VOCAB = {"siglip_so400m14.py": 32_000, "siglip2_vit_b16.py": 256_000, "siglip2_naflex_vit_b16.py": 256_000}
# Settings that only say where weights come from: the compiled program does not depend on them.
OVERRIDES = {"lit_demo.py": {"init_from_towers": ()}}
# Adding chips at a fixed global batch: CLIP B/32 at 4,096 (the measurement).
POD_SCALE_CONFIG, POD_SCALE_BATCH = "clip_vit_b32.py", 4096
POD_SCALE_TOPOLOGIES = ("v5p:2x2x2", "v5p:4x4x4")
# (key, label, overrides): the layer loop unrolled and rolled, and the program as it was before
# activation sharding (`activation_rules=()` leaves every activation layout to the compiler).
POD_SCALE_VARIANTS = (
    ("0", "unrolled (model.unroll=0, the default)", {"model.unroll": 0}),
    ("1", "rolled (model.unroll=1)", {"model.unroll": 1}),
    (
        "0-no-rules",
        "unrolled, activation_rules=() (as before this release)",
        {"model.unroll": 0, "activation_rules": ()},
    ),
)
FRONTIER_CONFIG = "clip_vit_b16.py"
FRONTIER_TOPOLOGIES = ("v5p:4x4x4", "v5e:16x16", "v6e:16x16")
# Examples per chip in each micro-batch of the micro-batched search (0: the config as shipped).
FRONTIER_MICRO = (0, 128)
FRONTIER_IMPLS = ("ring", "gather")
_POD = re.compile(r"^Pod:\s*(\S+)", re.MULTILINE)


def config_pod(name: str) -> str:
    """The topology a config's docstring names (`Pod: v5p:4x4x4 ...`)."""
    text = (ROOT / "configs" / name).read_text()
    doc = text.split('"""')[1] if text.startswith('"""') else ""
    found = _POD.search(doc)
    if not found:
        raise SystemExit(f"configs/{name}: its docstring names no pod (a line 'Pod: v5p:4x4x4 ...')")
    return found.group(1)


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"pod_scale": {}, "rows": {}, "frontier": {}}


def save_results(results: dict, *changed: tuple[str, str]) -> None:
    """Store the entries this run `changed` ((section, key) pairs) into the results file as it
    is now: a search that runs for hours must not overwrite the rows another run stored
    meanwhile with the copy it loaded at its start."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stored = load_results()
    for section, key in changed:
        stored.setdefault(section, {})[key] = results[section][key]
    RESULTS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


def run_row(name: str, topology: str = "") -> dict:
    from clipjax.planning.planner import build_plan
    from clipjax.planning.report import plan_record, render

    topology = topology or config_pod(name)
    config = load_config_file(str(ROOT / "configs" / name))
    apply_overrides(config, OVERRIDES.get(name, {}))
    start = time.perf_counter()
    plan = build_plan(
        config, topology, config_name=f"configs/{name}", vocab_size=VOCAB.get(name, 0), log=print
    )
    record = plan_record(plan)
    record["text"] = render(plan)  # what `python -m clipjax.plan` prints for it
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["measured"] = datetime.date.today().isoformat()
    record["remat"] = str(config.model.remat)
    record["unroll"] = int(config.model.unroll)
    record["loss"] = f"{config.loss.name} ({config.loss.impl})"
    return record


def run_pod_scale(topology: str, overrides: dict) -> dict:
    from clipjax.planning.compile import compile_train_steps, plan_mesh, planned_vocab_size, topology_devices

    config = load_config_file(str(ROOT / "configs" / POD_SCALE_CONFIG))
    apply_overrides(config, {"data.batch_size": POD_SCALE_BATCH, **overrides})
    _, devices = topology_devices(topology)
    mesh = plan_mesh(config, devices)
    step = compile_train_steps(config, mesh, vocab_size=planned_vocab_size(config), metrics=(False,))[False]
    return {
        "chips": len(devices),
        "temporaries": step.memory.temporaries,
        "total": step.memory.total,
        "compile_s": round(step.seconds, 1),
        "all_to_all": sum(1 for c in step.program.collectives() if c.kind == "all-to-all"),
        # The whole global batch of token ids on a chip: what the unconstrained step gathered.
        "global_token_arrays": sum(
            1
            for i in step.program.instructions()
            for a in i.arrays()
            if a.dtype == "s32" and a.dims == (POD_SCALE_BATCH, int(config.data.tokenizer.max_len))
        ),
        "measured": datetime.date.today().isoformat(),
    }


def frontier_key(topology: str, impl: str, micro: int) -> str:
    return f"{topology}/{impl}" + (f"/micro{micro}" if micro else "")


def run_frontier(topology: str, impl: str, micro: int, results: dict) -> dict:
    from clipjax.planning.planner import largest_batch

    config = load_config_file(str(ROOT / "configs" / FRONTIER_CONFIG))
    apply_overrides(config, {"loss.impl": impl, "loss.chunk": 0})
    key = frontier_key(topology, impl, micro)
    # Every probe is stored as it finishes (with its compile time), so a search that is stopped
    # resumes where it was: the whole table is hours of compiling on a 2-core host.
    probes = results.setdefault("frontier_probes", {}).setdefault(key, {})
    seconds = results.setdefault("frontier_probe_seconds", {}).setdefault(key, {})
    last = [time.perf_counter()]

    def log(message):
        print(message, flush=True)
        now = time.perf_counter()
        for batch in probes:
            seconds.setdefault(batch, round(now - last[0], 1))
        last[0] = now
        save_results(results, ("frontier_probes", key), ("frontier_probe_seconds", key))

    batch = largest_batch(config, topology, micro_per_chip=micro, probes=probes, log=log)
    return {
        "batch": batch,
        "probes": len(probes),
        "wall_s": round(sum(seconds.values()), 1),
        "measured": datetime.date.today().isoformat(),
    }


def render_pod_scale(results: dict) -> str:
    rows = results.get("pod_scale", {})
    lines = [
        "| layer loop | "
        + " | ".join(f"{t} temporaries per chip" for t in POD_SCALE_TOPOLOGIES)
        + " | ratio (ideal 0.125) | all-to-all instructions | instructions on all 4,096 token-id rows | compile |",
        "| --- |" + " ---: |" * (len(POD_SCALE_TOPOLOGIES) + 4),
    ]
    for variant, label, _ in POD_SCALE_VARIANTS:
        cells = [rows.get(f"{variant}/{t}") for t in POD_SCALE_TOPOLOGIES]
        if not all(cells):
            lines.append(f"| {label} |" + " not yet compiled |" * (len(POD_SCALE_TOPOLOGIES) + 4))
            continue
        ratio = cells[-1]["temporaries"] / cells[0]["temporaries"]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{_gib(c['temporaries'])} GiB" for c in cells)
            + f" | {ratio:.3f} | {', '.join(str(c['all_to_all']) for c in cells)} | "
            + f"{', '.join(str(c['global_token_arrays']) for c in cells)} | "
            + ", ".join(f"{c['compile_s']:.0f} s" for c in cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def render(results: dict) -> tuple[str, str]:
    rows = results["rows"]
    lines = [
        "| config | pod (chips) | global batch | per chip | train step GiB/chip | metrics step | embed images | HBM | fits | compile (train, metrics) | step estimate | MFU at most |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    keyed = [(name, name, config_pod(name), "") for name in SHIPPED] + [
        (name, f"{name}@{topology}", topology, " (not its pod)") for name, topology in EXTRA_ROWS
    ]
    for name, key, pod, remark in keyed:
        row = rows.get(key)
        if row is None or row["topology"] != pod:
            lines.append(f"| configs/{name}{remark} | {pod} | | | not yet compiled | | | | | | | |")
            continue
        steps = row["steps"]

        def total(step):
            s = steps.get(step)
            if s is None:
                return "-"
            return _gib(s["total_bytes"]) if s["fits"] else f"refused ({_gib(s['required_bytes'])} needed)"

        roof = row.get("roofline")
        lines.append(
            f"| configs/{name}{remark} | {row['topology']} ({row['chips']}) | {row['batch_size']:,} | "
            f"{row['batch_size'] // row['chips']:,} | {total('train')} | {total('metrics')} | "
            f"{total('embed images')} | {_gib(row['hbm_bytes'])} | {'yes' if row['fits'] else '**no**'} | "
            f"{steps['train']['compile_s']:.0f} s, {steps['metrics']['compile_s']:.0f} s | "
            + (
                f"{roof['step_s'] * 1e3:.0f} ms ({roof['bound']}) | {roof['mfu']:.0%} |"
                if roof
                else "- | - |"
            )
        )
    frontier = results.get("frontier", {})
    columns = [(impl, micro) for micro in FRONTIER_MICRO for impl in FRONTIER_IMPLS]

    def heading(impl, micro):
        return f"{impl} loss" + (f", micro-batches of {micro} per chip" if micro else " (as shipped)")

    flines = [
        "| topology | chips | " + " | ".join(heading(*c) for c in columns) + " | search time |",
        "| --- | ---: |" + " ---: |" * (len(columns) + 1),
    ]
    for topology in FRONTIER_TOPOLOGIES:
        found = [frontier.get(frontier_key(topology, impl, micro)) for impl, micro in columns]
        chips = 1
        for d in topology.split(":")[1].split("x"):
            chips *= int(d)
        probes = results.get("frontier_probes", {})
        seconds = results.get("frontier_probe_seconds", {})
        cells, took = [], 0.0
        for (impl, micro), r in zip(columns, found):
            key = frontier_key(topology, impl, micro)
            took += sum(seconds.get(key, {}).values())
            fitting = [int(b) for b, probe in probes.get(key, {}).items() if as_probe(probe).fits]
            if r:
                cells.append(f"{r['batch']:,}")
            elif fitting:
                # A search stopped part-way: what it has shown so far (the B/16 mesh is data x
                # fsdp over every chip, so the global batch is the per-chip batch x chips).
                cells.append(f"at least {max(fitting) * chips:,} (search unfinished)")
            else:
                cells.append("not yet searched")
        took_cell = f"{took / 60:.0f} min" if took else "-"
        flines.append(f"| {topology} | {chips} | " + " | ".join(cells) + f" | {took_cell} |")
    return "\n".join(lines) + "\n", "\n".join(flines) + "\n"


def write_doc(results: dict) -> None:
    configs, frontier = render(results)
    example = results["rows"].get(FRONTIER_CONFIG, {}).get("text", "(not yet compiled)\n")
    text = DOC.read_text()
    for key, table in (
        ("pod_scale", render_pod_scale(results)),
        ("example", "```\n" + example.strip("\n") + "\n```\n"),
        ("configs", configs),
        ("frontier", frontier),
    ):
        begin, end = f"<!-- scaling:{key}:begin -->", f"<!-- scaling:{key}:end -->"
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{table}{end}{tail}"
    DOC.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="", help="only the rows whose config file name contains this (no pod-scale table)"
    )
    parser.add_argument("--redo", action="store_true", help="recompile rows already in the results")
    parser.add_argument("--frontier", action="store_true", help="also search the largest batches")
    parser.add_argument("--pod_scale", action="store_true", help="only the fixed-batch scaling table")
    parser.add_argument("--markdown", action="store_true", help="only rewrite docs/scaling.md")
    parser.add_argument("--topology", default="", help="with --frontier: only this topology's row")
    args = parser.parse_args()
    results = load_results()
    if not args.markdown and (args.pod_scale or not args.only):
        for variant, label, overrides in POD_SCALE_VARIANTS:
            for topology in POD_SCALE_TOPOLOGIES:
                key = f"{variant}/{topology}"
                if key in results.setdefault("pod_scale", {}) and not args.redo:
                    continue
                print(f"== {POD_SCALE_CONFIG} at {POD_SCALE_BATCH:,} on {topology}: {label}", flush=True)
                results["pod_scale"][key] = run_pod_scale(topology, overrides)
                save_results(results, ("pod_scale", key))
    if not args.markdown and not args.pod_scale:
        wanted = [(name, name, config_pod(name)) for name in SHIPPED]
        wanted += [(name, f"{name}@{topology}", topology) for name, topology in EXTRA_ROWS]
        for name, key, pod in wanted:
            if args.only and args.only not in name:
                continue
            stored = results["rows"].get(key)
            if stored and stored["topology"] == pod and not args.redo:
                continue
            print(f"== configs/{name} on {pod}", flush=True)
            results["rows"][key] = run_row(name, pod)
            save_results(results, ("rows", key))
        if args.frontier:
            for topology in FRONTIER_TOPOLOGIES:
                if args.topology and args.topology != topology:
                    continue
                # Micro-batched first: those columns are where the two losses differ.
                for micro in sorted(FRONTIER_MICRO, reverse=True):
                    for impl in FRONTIER_IMPLS:
                        key = frontier_key(topology, impl, micro)
                        if key in results["frontier"] and not args.redo:
                            continue
                        print(f"== frontier: {FRONTIER_CONFIG} on {topology}, {key}", flush=True)
                        results["frontier"][key] = run_frontier(topology, impl, micro, results)
                        save_results(results, ("frontier", key))
    # What every run stored, this one's and any other's that ran meanwhile.
    write_doc(load_results())
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
