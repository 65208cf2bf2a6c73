"""The false-negative study: does a large batch teach nuisance, and do the objectives help?

    python benchmarks/false_negatives.py --quick                 # a few minutes on 2 CPU cores
    python benchmarks/false_negatives.py --plan study            # the study of docs/false_negatives.md
    python benchmarks/false_negatives.py --plan full             # every cell the issue names

Each cell trains a fresh model on the embedded `shapes` data with nuisance factors (background
light, gradient, texture, sensor noise, vignette; `data.shapes_nuisance`) and K concepts
(`data.shapes_concepts`), in image-image (SimCLR, `configs/simclr_demo.py`) or image-text
(`configs/demo.py`) mode, for one objective, batch size, budget and seed, then measures:

- the in-batch collisions (same-concept negatives per anchor) against (B - 1) / K;
- linear-probe top-1 of the frozen tower features on the semantic labels (shape, color, size)
  and on the nuisance labels, and the kNN top-1 on the concept; zero-shot in image-text mode;
- effective rank (RankMe), alignment and uniformity of the embeddings the loss saw, at the end.

Budgets: `samples` fixes the examples seen (steps = samples / B, so a large batch takes few
steps) and `steps` fixes the number of steps (a large batch sees more data). The results go to
a JSON file (every cell, with its config overrides and wall time) and, with --markdown, into the
generated section of docs/false_negatives.md with plots in docs/images/. Cells already in the
JSON are not rerun, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from clipjax.data.sources.shapes import procedural as shapes  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SEMANTIC = ("shape", "color", "size")
NUISANCE = shapes.NUISANCE_NAMES
NUISANCE_CLASSES = {name: len(classes) for name, classes in shapes.NUISANCE_FACTORS.items()}


def objectives(k: int) -> dict[str, dict]:
    """Objective name -> `loss.*` overrides; the DCL class prior is the true 1/K."""
    return {
        "infonce": {"loss.name": "softmax"},
        "multi_positive_oracle": {"loss.name": "multi_positive", "loss.positives": "label"},
        "fnc_eliminate": {"loss.name": "fnc", "loss.fnc_mode": "eliminate"},
        "fnc_attract": {"loss.name": "fnc", "loss.fnc_mode": "attract"},
        "dcl": {"loss.name": "dcl", "loss.dcl_class_prior": 1.0 / k},
        "soft_targets": {"loss.name": "soft_targets"},
        "sogclr": {"loss.name": "sogclr"},
    }


# Plans: which cells run. A plan is a list of blocks, each the product of its batch sizes,
# objectives and seeds at one (mode, budget, K); a cell is (mode, budget, batch, K, objective, seed).
ALL_OBJECTIVES = tuple(objectives(1))
STUDY_SAMPLES = ("samples", 24_576)
FIVE_OBJECTIVES = ("infonce", "multi_positive_oracle", "fnc_eliminate", "dcl", "sogclr")


def block(mode, budget, concepts, objectives, batches=(64, 256, 1024), seeds=(0,)) -> dict:
    return dict(
        mode=mode, budget=budget, concepts=concepts, batches=batches, objectives=objectives, seeds=seeds
    )


PLANS = {
    "quick": dict(
        blocks=[
            block(
                "image_image",
                ("steps", 12),
                32,
                ("infonce", "multi_positive_oracle", "fnc_eliminate"),
                batches=(64, 256),
            )
        ],
        num_train=4096,
        probe_examples=1024,
        eval_examples=512,
    ),
    "study": dict(
        blocks=[
            block("image_image", STUDY_SAMPLES, 32, FIVE_OBJECTIVES),
            block("image_image", STUDY_SAMPLES, 320, FIVE_OBJECTIVES),
            block("image_image", ("steps", 32), 32, ("infonce", "multi_positive_oracle", "sogclr")),
            # Added after the first 39 cells: the two other label-free objectives, image-text mode,
            # then a second seed (in that order, so a study cut short lacks seeds, not objectives).
            block("image_image", STUDY_SAMPLES, 320, ("fnc_attract", "soft_targets")),
            block(
                "image_text",
                STUDY_SAMPLES,
                320,
                ("infonce", "multi_positive_oracle", "fnc_eliminate", "sogclr"),
            ),
            block("image_image", STUDY_SAMPLES, 320, FIVE_OBJECTIVES, seeds=(1,)),
            # Then the second seed of those two, and B = 4,096 where a CPU can afford it: the
            # fixed-steps block (32 steps of 4,096 is 131,072 samples, eight epochs).
            block("image_image", STUDY_SAMPLES, 320, ("fnc_attract", "soft_targets"), seeds=(1,)),
            block(
                "image_image",
                ("steps", 32),
                32,
                ("infonce", "multi_positive_oracle", "sogclr"),
                batches=(4096,),
            ),
            # Image-text at a fixed step count: does nuisance still rise with B once the large
            # batch is not also the under-trained one?
            block("image_text", ("steps", 96), 320, ("infonce",)),
        ],
        num_train=16_384,
        probe_examples=4096,
        eval_examples=2000,
    ),
    "full": dict(
        blocks=[
            block(mode, budget, k, ALL_OBJECTIVES, batches=(64, 256, 1024, 4096), seeds=(0, 1))
            for mode in ("image_image", "image_text")
            for budget in (("samples", 131_072), ("steps", 256))
            for k in (32, 320)
        ],
        num_train=50_000,
        probe_examples=5000,
        eval_examples=2000,
    ),
}


def load_config(name: str, arg: str = ""):
    from clipjax.cli import load_config_file

    path = os.path.join(ROOT, "configs", f"{name}.py")
    return load_config_file(f"{path}:{arg}" if arg else path)


def cell_steps(budget, batch) -> int:
    """A cell's train steps: `samples` / B (at least one), or the `steps` budget itself."""
    kind, amount = budget
    return max(1, amount // batch) if kind == "samples" else amount


def cell_config(mode, budget, batch, concepts, objective, seed, plan, data_dir):
    from clipjax.config import apply_overrides

    steps = cell_steps(budget, batch)
    if mode == "image_image":
        config = load_config("simclr_demo", "keep_nuisance")
        overrides = {"optim.lr": config.optim.lr * batch / config.data.batch_size}
    else:
        config = load_config("demo")
        overrides = {
            "data.shapes_nuisance": True,
            "evals.retrieval.enabled": False,
            "evals.embedding.enabled": False,
        }
    fields = SEMANTIC + NUISANCE
    overrides.update(
        {
            "seed": seed,
            "steps": steps,
            "data.batch_size": batch,
            "data.shapes_concepts": concepts,
            "data.num_train": plan["num_train"],
            "data.num_test": plan["eval_examples"],
            "data.data_dir": data_dir,
            "data.worker_count": 0,
            "log_every": max(1, steps // 4),
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
            "metrics.every": max(1, steps // 4),
            "evals.max_examples": plan["eval_examples"],
            "evals.linear_probe.train_examples": plan["probe_examples"],
            "evals.linear_probe.fields": fields,
            "evals.knn.train_examples": plan["probe_examples"],
            "evals.knn.fields": (),
            "optim.warmup_fraction": 0.1,
        }
    )
    overrides.update(objectives(concepts)[objective])
    return apply_overrides(config, overrides), overrides


def summarise(report: dict, metrics: list[dict], batch: int, concepts: int) -> dict:
    probe = report.get("linear_probe", {}).get("fields", {})
    semantic = [probe[f] for f in SEMANTIC if f in probe]
    # Above-chance share of each nuisance factor's probe accuracy: 0 = not decodable, 1 = perfectly.
    nuisance = [
        (probe[f] - 1 / NUISANCE_CLASSES[f]) / (1 - 1 / NUISANCE_CLASSES[f]) for f in NUISANCE if f in probe
    ]
    measured = [r for r in metrics if "label_collision_count_mean" in r]
    last = measured[-1] if measured else {}
    out = {
        "semantic_probe": float(np.mean(semantic)) if semantic else None,
        "shape_probe": probe.get("shape"),
        "nuisance_decodability": float(np.mean(nuisance)) if nuisance else None,
        "probe": probe,
        "knn_concept_top1@k20": report.get("knn", {}).get("top1@k20"),
        "zero_shot_mean_top1": report.get("zero_shot", {}).get("mean_top1"),
        "collisions_measured": float(np.mean([r["label_collision_count_mean"] for r in measured]))
        if measured
        else None,
        "collisions_expected": (batch - 1) / concepts,
        "collision_prob_mass": float(np.mean([r["label_collision_prob_mass"] for r in measured]))
        if measured
        else None,
        "effective_rank": last.get("img_effective_rank"),
        "alignment": last.get("alignment"),
        "uniformity": last.get("img_uniformity"),
        "final_loss": next((r["loss"] for r in reversed(metrics) if "loss" in r), None),
    }
    return out


def run_cell(cell, plan, data_dir) -> dict:
    from clipjax.trainer.run import train

    mode, budget, batch, concepts, objective, seed = cell
    config, overrides = cell_config(mode, budget, batch, concepts, objective, seed, plan, data_dir)
    workdir = tempfile.mkdtemp(prefix="clipjax_fn_")
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            report = train(config, workdir, log=lambda line: None)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(report, metrics, batch, concepts)
    result.update(
        mode=mode,
        budget=list(budget),
        batch=batch,
        concepts=concepts,
        objective=objective,
        seed=seed,
        steps=int(config.steps),
        wall_s=time.perf_counter() - t0,
        overrides={k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
    )
    return result


def untrained_report(config) -> dict:
    """The evaluation report of `config`'s evaluators on the parameters it initialises (step 0)."""
    from clipjax.data.sources import make_source
    from clipjax.evals.runner import EvalRunner
    from clipjax.parallel import make_mesh
    from clipjax.trainer.state import init_train_state

    source = make_source(config.data)
    source.prepare()
    tokenizer = source.tokenizer()
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    return EvalRunner(config, source, tokenizer).run(setup.graphdef, setup.state["params"], mesh, 0)


def random_tower_probe(plan, data_dir, concepts) -> dict:
    """The same probes on the untrained tower: the floor a trained one must clear."""
    config, _ = cell_config("image_image", ("steps", 1), 64, concepts, "infonce", 0, plan, data_dir)
    return summarise(untrained_report(config), [], 64, concepts)


def cell_key(cell) -> str:
    mode, (kind, amount), batch, concepts, objective, seed = cell
    return f"{mode}/{kind}{amount}/B{batch}/K{concepts}/{objective}/seed{seed}"


def cells(plan):
    for block in plan["blocks"]:
        for batch in block["batches"]:
            for objective in block["objectives"]:
                for seed in block["seeds"]:
                    yield (block["mode"], block["budget"], batch, block["concepts"], objective, seed)


def estimated_hours(plan, results: list[dict]) -> dict[str, float]:
    """Hours a plan would take on the machine that ran `results`, per mode: each mode's cell time
    fitted as a fixed part (set-up, compile, probes) plus a part per training example, by least
    squares over the cells run, then summed over the plan's cells. None for a mode never run."""
    hours = {}
    for mode in sorted({block["mode"] for block in plan["blocks"]}):
        run = [r for r in results if r["mode"] == mode and "wall_s" in r]
        if len({r["steps"] * r["batch"] for r in run}) < 2:
            hours[mode] = None
            continue
        design = np.array([[1.0, r["steps"] * r["batch"]] for r in run])
        (fixed, per_sample), *_ = np.linalg.lstsq(design, np.array([r["wall_s"] for r in run]), rcond=None)
        todo = [cell_steps(c[1], c[2]) * c[2] for c in cells(plan) if c[0] == mode]
        hours[mode] = (len(todo) * max(fixed, 0.0) + per_sample * sum(todo)) / 3600
    return hours


# ------------------------------------------------------------------------------------- output


def _fmt(v, pct=True):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _group(results, keys):
    groups: dict = {}
    for r in results:
        groups.setdefault(
            tuple(r[k] if not isinstance(r[k], list) else tuple(r[k]) for k in keys), []
        ).append(r)
    return groups


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def markdown(results: list[dict], baseline: list[dict] | None, plan_name: str, wall_s: float) -> str:
    lines = [
        f"Plan `{plan_name}`: {len(results)} runs, {wall_s / 60:.1f} min of training and evaluation "
        f"on this machine (`python benchmarks/false_negatives.py --plan {plan_name} --markdown`).",
        "",
    ]
    others = [name for name in PLANS if name not in (plan_name, "quick")]
    for name in others:
        hours = estimated_hours(PLANS[name], results)
        if all(h is not None for h in hours.values()):
            lines += [
                f"Plan `{name}` ({sum(1 for _ in cells(PLANS[name]))} runs) would take about "
                f"{sum(hours.values()):.0f} hours on the same machine ("
                + ", ".join(f"{mode} {h:.0f}" for mode, h in hours.items())
                + "), at each mode's time per run fitted to the runs above as a fixed part plus a part "
                "per training example.",
                "",
            ]
    for floor in baseline or []:
        lines += [
            f"Untrained tower (image-image, K = {floor['concepts']}): semantic probe "
            f"{_fmt(floor['semantic_probe'])}% (shape {_fmt(floor['shape_probe'])}%), nuisance "
            f"decodability {_fmt(floor['nuisance_decodability'])}%, kNN concept {_fmt(floor['knn_concept_top1@k20'])}%; "
            "per label: " + ", ".join(f"{k} {_fmt(v)}%" for k, v in floor["probe"].items()) + ".",
            "",
        ]
    for (mode, budget, concepts), rows in sorted(_group(results, ("mode", "budget", "concepts")).items()):
        kind, amount = budget
        what = f"{amount:,} samples seen" if kind == "samples" else f"{amount} steps"
        lines += [
            f"### {mode}, K = {concepts} concepts, {what}",
            "",
            "Mean over seeds (± std when there are several). Semantic: mean linear-probe top-1 on "
            "shape, color, size. Nuisance: mean above-chance decodability of the five nuisance factors "
            "(0 = chance, 100 = perfect). Collisions: same-concept negatives per anchor, measured / (B-1)/K.",
            "",
            "| objective | B | steps | semantic % | shape % | nuisance % | kNN concept % | "
            + ("zero-shot % | " if mode == "image_text" else "")
            + "collisions | eff. rank | align | unif |",
            "|---|---|---|---|---|---|---|" + ("---|" if mode == "image_text" else "") + "---|---|---|---|",
        ]
        for (objective, batch), cell in sorted(
            _group(rows, ("objective", "batch")).items(), key=lambda kv: (kv[0][0], kv[0][1])
        ):
            sem, sem_sd = _mean(cell, "semantic_probe")
            shape, _ = _mean(cell, "shape_probe")
            nui, nui_sd = _mean(cell, "nuisance_decodability")
            knn, _ = _mean(cell, "knn_concept_top1@k20")
            zs, _ = _mean(cell, "zero_shot_mean_top1")
            col, _ = _mean(cell, "collisions_measured")
            rank, _ = _mean(cell, "effective_rank")
            align, _ = _mean(cell, "alignment")
            unif, _ = _mean(cell, "uniformity")
            sd = lambda s: f" ± {100 * s:.1f}" if s and len(cell) > 1 else ""
            lines.append(
                f"| {objective} | {batch} | {cell[0]['steps']} | {_fmt(sem)}{sd(sem_sd)} | {_fmt(shape)} "
                f"| {_fmt(nui)}{sd(nui_sd)} "
                f"| {_fmt(knn)} | "
                + (f"{_fmt(zs)} | " if mode == "image_text" else "")
                + f"{_fmt(col, False)} / {cell[0]['collisions_expected']:.3g} | {_fmt(rank, False)} "
                f"| {_fmt(align, False)} | {_fmt(unif, False)} |"
            )
        lines += hypothesis_lines(rows) + [""]
    return "\n".join(lines)


def hypothesis_lines(rows: list[dict]) -> list[str]:
    """The three numbers the hypothesis is about, from one block's cells (points, not %)."""

    def at(objective, batches, key):
        cell = [r for r in rows if r["objective"] == objective and r["batch"] in batches]
        return _mean(cell, key)[0]

    batches = sorted({r["batch"] for r in rows})
    small, large = [b for b in batches if b <= 256], [b for b in batches if b >= 1024]
    if not small or not large:
        return []
    out = []
    n_small, n_large = (
        at("infonce", small, "nuisance_decodability"),
        at("infonce", large, "nuisance_decodability"),
    )
    if n_small is not None and n_large is not None:
        out.append(
            f"- InfoNCE nuisance decodability at B >= 1024 minus at B <= 256: {100 * (n_large - n_small):+.1f} points."
        )
    plain = at("infonce", large, "semantic_probe")
    others = {o: at(o, large, "semantic_probe") for o in {r["objective"] for r in rows} - {"infonce"}}
    others = {o: v for o, v in others.items() if v is not None}
    # The oracle reads the labels, so the best objective a user without labels can run is
    # reported on its own line too.
    label_free = {o: v for o, v in others.items() if "oracle" not in o}
    pools = [("objective", others)] + ([("label-free objective", label_free)] if label_free != others else [])
    for what, pool in pools:
        if plain is not None and pool:
            best = max(pool, key=pool.get)
            out.append(
                f"- Best {what} at B >= 1024 ({best}) minus InfoNCE, semantic probe: "
                f"{100 * (pool[best] - plain):+.1f} points."
            )
    small_sog = at("sogclr", [batches[0]], "semantic_probe")
    if plain is not None and small_sog is not None:
        out.append(
            f"- SogCLR at B = {batches[0]} minus InfoNCE at B >= 1024, semantic probe: "
            f"{100 * (small_sog - plain):+.1f} points."
        )
    return out


def plot(results: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted(_group(results, ("mode", "budget", "concepts")).items())
    fig = Figure(figsize=(6 * len(groups), 8), layout="constrained")
    FigureCanvasAgg(fig)
    for col, ((mode, budget, concepts), rows) in enumerate(groups):
        for row, (key, label) in enumerate(
            (("semantic_probe", "semantic probe top-1"), ("nuisance_decodability", "nuisance decodability"))
        ):
            ax = fig.add_subplot(2, len(groups), row * len(groups) + col + 1)
            for objective, cell in sorted(_group(rows, ("objective",)).items()):
                by_batch = sorted(_group(cell, ("batch",)).items())
                xs = [b for (b,), _ in by_batch]
                ys = [_mean(c, key)[0] for _, c in by_batch]
                # One colour per objective on every panel, whichever objectives a block runs.
                color = f"C{ALL_OBJECTIVES.index(objective[0])}"
                ys = [100 * y if y is not None else np.nan for y in ys]
                ax.plot(xs, ys, marker="o", color=color, label=objective[0])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch B")
            ax.set_ylabel(label + " (%)")
            kind, amount = budget
            ax.set_title(f"{mode}, K={concepts}, {amount} {kind}")
            if row == 0:
                ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


DOC = os.path.join(ROOT, "docs", "false_negatives.md")
BEGIN, END = "<!-- results: benchmarks/false_negatives.py -->\n", "<!-- end results -->"


def write_doc(section: str) -> None:
    with open(DOC) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    with open(DOC, "w") as f:
        f.write(head + BEGIN + section + "\n" + END + rest.split(END, 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=tuple(PLANS), default="study")
    parser.add_argument("--quick", action="store_true", help="the `quick` plan (minutes on 2 CPU cores)")
    parser.add_argument("--results", default="", help="JSON of every cell (default benchmarks/results/...)")
    parser.add_argument(
        "--markdown", action="store_true", help="write the tables into docs/false_negatives.md"
    )
    parser.add_argument(
        "--data_dir", default="", help="where the datasets are rendered (default: a temp dir)"
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="tables (and --markdown) from the cells already in the JSON",
    )
    args = parser.parse_args()
    plan_name = "quick" if args.quick else args.plan
    plan = PLANS[plan_name]
    results_path = args.results or os.path.join(
        ROOT, "benchmarks", "results", f"false_negatives_{plan_name}.json"
    )
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    done, stored = {}, {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            stored = json.load(f)
        done = {r["key"]: r for r in stored.get("cells", [])}
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="clipjax_fn_data_")
    t0 = time.perf_counter()
    todo = list(cells(plan))
    results = []
    for i, cell in enumerate(todo):
        key = cell_key(cell)
        if key in done:
            results.append(done[key])
            continue
        if args.report_only:
            continue
        result = run_cell(cell, plan, data_dir)
        result["key"] = key
        results.append(result)
        print(
            f"[{i + 1}/{len(todo)}] {key}: semantic {_fmt(result['semantic_probe'])}%, nuisance "
            f"{_fmt(result['nuisance_decodability'])}%, collisions {_fmt(result['collisions_measured'], False)}"
            f" / {result['collisions_expected']:.3g}, {result['wall_s']:.0f} s",
            flush=True,
        )
        with open(results_path, "w") as f:
            json.dump(
                {
                    "plan": plan_name,
                    "cells": results + [r for k, r in done.items() if k not in {x["key"] for x in results}],
                },
                f,
                indent=1,
            )
    # The untrained tower, per K: the floor each trained cell must clear.
    baseline = stored.get("untrained") if args.report_only else None
    if not isinstance(baseline, list):
        baseline = []
        for concepts in sorted({b["concepts"] for b in plan["blocks"]}):
            floor = random_tower_probe(plan, data_dir, concepts)
            floor["concepts"] = concepts
            baseline.append(floor)
    wall = sum(r["wall_s"] for r in results)
    with open(results_path, "w") as f:
        json.dump({"plan": plan_name, "cells": results, "untrained": baseline, "wall_s": wall}, f, indent=1)
    missing = len(todo) - len(results)
    section = markdown(results, baseline, plan_name, wall)
    if missing:
        section = f"**Partial: {missing} of the plan's {len(todo)} cells have not run yet.**\n\n" + section
    print(section)
    if args.markdown:
        image = os.path.join(ROOT, "docs", "images", f"false_negatives_{plan_name}.png")
        plot(results, image)
        write_doc(section + f"\n![accuracy against batch size](images/false_negatives_{plan_name}.png)\n")
    print(f"total {time.perf_counter() - t0:.0f} s; results in {results_path}")
    if not args.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
