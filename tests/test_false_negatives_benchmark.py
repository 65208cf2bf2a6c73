"""benchmarks/false_negatives.py: its cells resolve into valid configs, and its summary numbers
(nuisance decodability, collisions, the hypothesis lines) are what the results say."""

import pytest

from clipjax.config import validate
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("false_negatives")


@pytest.mark.parametrize("plan", ["quick", "study", "full"])
def test_every_cell_of_every_plan_is_a_valid_config(bench, plan, tmp_path):
    seen = set()
    for cell in bench.cells(bench.PLANS[plan]):
        mode, budget, batch, concepts, objective, seed = cell
        if (mode, objective, concepts) in seen:
            continue  # the batch and budget only scale numbers the checks below cover once
        seen.add((mode, objective, concepts))
        config, overrides = bench.cell_config(*cell, bench.PLANS[plan], str(tmp_path))
        validate(config, num_devices=1)
        assert config.task == mode and config.data.batch_size == batch
        assert config.data.shapes_concepts == concepts and config.data.shapes_nuisance
        kind, amount = budget
        assert config.steps == (max(1, amount // batch) if kind == "samples" else amount)
        if objective == "dcl":
            assert config.loss.dcl_class_prior == pytest.approx(1 / concepts)
    assert len(list(bench.cells(bench.PLANS[plan]))) == len(
        {bench.cell_key(c) for c in bench.cells(bench.PLANS[plan])}
    )


def test_summary_and_hypothesis_numbers(bench):
    chance = {f: 1 / n for f, n in bench.NUISANCE_CLASSES.items()}

    def result(objective, batch, semantic, nuisance_share):
        probe = {f: semantic for f in bench.SEMANTIC}
        probe.update({f: chance[f] + nuisance_share * (1 - chance[f]) for f in bench.NUISANCE})
        metrics = [
            {"step": 1, "label_collision_count_mean": (batch - 1) / 32, "label_collision_prob_mass": 0.1}
        ]
        r = bench.summarise({"linear_probe": {"fields": probe}}, metrics, batch, 32)
        r.update(
            objective=objective, batch=batch, steps=10, mode="image_image", budget=["steps", 10], concepts=32
        )
        return r

    r = result("infonce", 64, 0.8, 0.25)
    assert r["semantic_probe"] == pytest.approx(0.8)
    assert r["nuisance_decodability"] == pytest.approx(0.25)
    assert r["collisions_measured"] == pytest.approx(r["collisions_expected"])
    rows = [
        result("infonce", 64, 0.80, 0.20),
        result("infonce", 256, 0.82, 0.30),
        result("infonce", 1024, 0.70, 0.55),
        result("multi_positive_oracle", 1024, 0.76, 0.10),
        result("sogclr", 64, 0.69, 0.2),
    ]
    lines = "\n".join(bench.hypothesis_lines(rows))
    assert "+30.0 points" in lines  # 0.55 - mean(0.20, 0.30)
    assert (
        "objective at B >= 1024 (multi_positive_oracle) minus InfoNCE, semantic probe: +6.0 points" in lines
    )
    assert "label-free" not in lines  # no label-free objective ran at B >= 1024
    rows.append(result("dcl", 1024, 0.72, 0.5))
    lines = "\n".join(bench.hypothesis_lines(rows))
    assert (
        "objective at B >= 1024 (multi_positive_oracle) minus InfoNCE, semantic probe: +6.0 points" in lines
    )
    assert "label-free objective at B >= 1024 (dcl) minus InfoNCE, semantic probe: +2.0 points" in lines
    rows.pop()
    assert "SogCLR at B = 64 minus InfoNCE at B >= 1024, semantic probe: -1.0 points" in lines
    table = bench.markdown(rows, None, "quick", 60.0)
    assert table.count("| infonce |") == 3 and "| multi_positive_oracle | 1024 | 10 | 76.0 |" in table


def test_run_time_estimate_of_a_plan_fits_a_fixed_and_a_per_example_cost(bench):
    # Runs that took exactly 30 s + 2 ms per training example, in one mode only.
    results = [
        dict(mode="image_image", steps=steps, batch=batch, wall_s=30 + 0.002 * steps * batch)
        for steps, batch in ((384, 64), (96, 256), (32, 1024), (32, 64))
    ]
    plan = dict(
        blocks=[bench.block("image_image", ("steps", 10), 32, ("infonce", "dcl"), batches=(64, 4096))]
        + [bench.block("image_text", ("samples", 1000), 32, ("infonce",))]
    )
    hours = bench.estimated_hours(plan, results)
    # Four image-image runs of 10 steps at B = 64 and 4,096 (two objectives); no image-text run yet.
    expected = (4 * 30 + 0.002 * 2 * 10 * (64 + 4096)) / 3600
    assert hours["image_image"] == pytest.approx(expected, rel=1e-9)
    assert hours["image_text"] is None
    assert bench.cell_steps(("samples", 1000), 64) == 15
