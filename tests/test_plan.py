"""`python -m clipjax.plan`: one-line errors, a memory table whose total is the sum of its parts,
the same numbers on every run, the collectives read from the program, and the batch search."""

import dataclasses
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from clipjax.cli import load_config_file
from clipjax.config import apply_overrides
from clipjax.planning import compile as compile_lib
from clipjax.planning.chips import CHIPS, TopologyError, parse_topology
from clipjax.planning.compile import compile_train_steps, plan_mesh, topology_devices
from clipjax.planning.hlo import Program, summarize
from clipjax.planning.report import Plan, Probe, find_batch, memory_table, render

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "clip_vit_b16.py") + ":tiny"


def _plan_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "clipjax.plan", "--config", TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("clipjax.plan:")]


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v9x:2x2", "expected GENERATION:AxBxC"),
        ("v5p:4x4", "a v5p slice is AxBxC chips"),
        ("v5e:3x3", "the TPU compiler refused it"),
    ],
)
def test_a_bad_topology_is_one_line(topology, message):
    if "refused" not in message:
        with pytest.raises(TopologyError, match=message):
            parse_topology(topology)
        return
    result = _plan_cli("--topology", topology)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _our_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0] and topology in lines[0], result.stderr[-2000:]


def test_a_mesh_that_does_not_match_the_topology_is_one_line():
    result = _plan_cli("--topology", "v5e:2x2", "--config.mesh.shape=(3,-1,1)")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _our_lines(result.stderr)
    assert len(lines) == 1 and "mesh.shape" in lines[0] and "4" in lines[0], result.stderr[-2000:]


def test_a_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = compile_lib.importlib.util.find_spec
    monkeypatch.setattr(
        compile_lib.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(compile_lib.LibtpuMissing, match=r"pip install 'jax\[tpu\]=="):
        topology_devices("v5e:2x2")


def _compiled_tiny():
    config = load_config_file(TINY)
    apply_overrides(config, {"mesh.shape": (1, -1, 1)})
    _, devices = topology_devices("v5e:2x2")
    mesh = plan_mesh(config, devices)
    return config, mesh, compile_train_steps(config, mesh, vocab_size=300, metrics=(False,))[False]


def test_the_memory_total_is_the_sum_of_its_parts_and_the_same_on_every_run():
    config, mesh, step = _compiled_tiny()
    parts = dataclasses.asdict(step.memory)
    assert step.memory.total == sum(parts.values())
    # The parts are the compiler's own accounting: arguments + temporaries + fresh outputs.
    assert parts["temporaries"] > 0 and parts["params"] > 0 and parts["opt_state"] >= 2 * parts["params"]
    plan = Plan("tiny", "v5e:2x2", CHIPS["v5e"], mesh.size, dict(mesh.shape), 32, {"train": step}, 1e9)
    table = memory_table(plan)
    total_row = next(line for line in table if line.startswith("| **total**"))
    assert f"{step.memory.total / 2**20:.1f} MiB" in total_row
    _, _, again = _compiled_tiny()
    assert again.memory == step.memory and again.flops == step.flops
    assert summarize(again.program.collectives()) == summarize(step.program.collectives())
    text = render(plan)
    assert "**Fits**" in text and "| all-gather |" in text and "MFU at most" in text


def test_a_naflex_step_is_compiled_at_its_longest_sequence(monkeypatch):
    """A NaFlex model's abstract train batch: patch sequences of its longest training length (64
    of 16 and 64 patches of 4 px) and their grids, as the step receives them (nothing compiled)."""
    from clipjax.parallel import make_mesh

    config = load_config_file(str(ROOT / "configs" / "siglip2_naflex_vit_b16.py") + ":tiny")
    mesh = make_mesh(config.mesh)
    monkeypatch.setattr(compile_lib, "compile_program", lambda name, lowered, parts, mesh: parts)
    parts = compile_train_steps(config, mesh, vocab_size=300, metrics=(False,))[False]
    rows = config.data.batch_size // mesh.size  # per device: images, grids, texts, three ids
    assert parts["batch"] == rows * (64 * 4 * 4 * 3 + 2 * 4 + config.data.tokenizer.max_len * 4 + 3 * 4)


HLO = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,4]{1,0} all-gather(%x), replica_groups=[1,4]<=[4], dimensions={0}, metadata={op_name="gather"}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %x)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %p = (s32[], f32[8,4]) parameter(0)
  %c = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body
  %ar = f32[8,4]{1,0} all-reduce(%a), replica_groups={{0,1,2,3}}, to_apply=%add
  %rs = f32[2,4]{1,0} reduce-scatter(%a), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_inside_a_loop_count_once_per_iteration():
    program = Program(HLO)
    table = summarize(program.collectives())
    gather, reduce = table["all-gather"], table["all-reduce"]
    assert gather["runs"] == 12 and gather["bytes"] == 12 * 32 * 4 * 4
    assert gather["moved"] == pytest.approx(12 * 32 * 4 * 4 * 3 / 4)  # (n-1)/n of each result
    assert reduce["runs"] == 1 and reduce["moved"] == pytest.approx(2 * 8 * 4 * 4 * 3 / 4)
    # A reduce-scatter counts the whole array it reduces (each chip keeps a quarter of it).
    scatter = table["reduce-scatter"]
    assert scatter["bytes"] == 8 * 4 * 4 and scatter["moved"] == pytest.approx(8 * 4 * 4 * 3 / 4)


def test_find_batch_bisects_to_the_largest_that_fits():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 1000

    assert find_batch(fits, start=64, granule=8, log=lambda _: None) == 1000
    assert len(calls) < 20
    assert find_batch(lambda b: b <= 20, start=512, granule=4, log=lambda _: None) == 20
    assert find_batch(lambda b: False, start=64, granule=8, log=lambda _: None) == 0


def test_find_batch_stops_within_its_resolution_of_the_answer():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 100_000

    found = find_batch(fits, start=512, granule=8, resolution=8, log=lambda _: None)
    # Doubling 512 -> 131,072 (9 probes), then bisection only until the bracket is an eighth of
    # the answer: 3 probes, where a granule of 8 would take 13.
    assert 100_000 * 7 / 8 <= found <= 100_000 and found % 8 == 0
    assert len(calls) <= 12


def test_find_batch_aims_at_the_boundary_when_probes_know_their_memory():
    """With the memory each probe asked for, the search aims where it reaches HBM: an affine
    memory (the towers' activations) takes 5 probes where doubling and bisection take 12, and a
    quadratic one (the gather loss's logits) stays within the resolution."""

    def search(fill_at, known=None):
        calls = []

        def fits(b):
            calls.append(b)
            return Probe(fill_at(b) <= 1.0, fill_at(b))

        found = find_batch(fits, start=512, granule=128, resolution=8, known=known, log=lambda _: None)
        truth = max(b for b in range(128, 1 << 22, 128) if fill_at(b) <= 1.0)
        return found, truth, calls

    found, truth, calls = search(lambda b: 0.2 + 0.8 * b / 100_000)
    assert found == truth == 99_968 and len(calls) <= 5
    found, truth, calls = search(lambda b: 0.1 + 0.9 * (b / 150_000) ** 2)
    assert truth * 7 / 8 <= found <= truth and len(calls) <= 9
    # A resumed search starts from the probes it had (bools, as stored before fills were kept).
    found, truth, calls = search(
        lambda b: 0.2 + 0.8 * b / 100_000, known={512: True, 1024: True, 262144: False}
    )
    assert found == truth and 512 not in calls and 1024 not in calls and len(calls) <= 4


def test_a_refusal_for_memory_is_a_result():
    error = RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 143.94G of 95.74G hbm.\nthe total memory required for HLO temporaries (143.94G) exceeds "
        "available HBM (95.74G)"
    )
    line, required = compile_lib._refusal(error)
    assert "exceeds available HBM" in line and required == int(143.94 * 2**30)
    assert re.search(r"\d", line)


# Demos and the fine-tuning recipe run where the user is (a CPU, or the converted model's pod).
NO_POD = {"demo.py", "simclr_demo.py", "finetune_pretrained.py"}


def test_every_config_that_trains_at_scale_names_a_pod_plan_can_parse():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", ROOT / "benchmarks" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    SHIPPED, config_pod = scaling.SHIPPED, scaling.config_pod

    names = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
    for name in names:
        if name in NO_POD:
            continue
        chip, shape = parse_topology(config_pod(name))
        assert chip.name in CHIPS and shape, name
    assert set(SHIPPED) <= set(names) - NO_POD


def test_largest_batch_checks_both_steps_and_sets_the_micro_batches(monkeypatch):
    """The search's wiring, with a stand-in compiler: the memory model says what fits."""
    from clipjax.planning import planner
    from clipjax.planning.compile import CompiledStep, MemoryParts

    seen = []
    hbm = CHIPS["v5e"].hbm_bytes

    def fake_compile(config, mesh, *, vocab_size, metrics):
        per_chip = config.data.batch_size // mesh.size
        micro = per_chip // config.microbatches
        seen.append((per_chip, int(config.microbatches), metrics))
        # 10 MiB per example the towers hold at once, 1 MiB per example of the whole block
        # (embeddings, loss), and the metrics step 5% more.
        total = (10 * micro + per_chip) * 2**20 * (1.05 if metrics == (True,) else 1.0)
        memory = MemoryParts(0, 0, 0, 0, 0, int(total), 0)
        return {metrics[0]: CompiledStep("step", 0.0, memory, 0.0, 0.0, None)}

    monkeypatch.setattr(planner, "compile_train_steps", fake_compile)
    config = load_config_file(TINY)
    apply_overrides(config, {"mesh.shape": (1, -1, 1), "data.batch_size": 256})
    found = planner.largest_batch(config, "v5e:2x2", vocab_size=300, log=lambda _: None)
    per_chip = found // 4
    # Without micro-batches: 11 MiB per example, metrics step 5% more: 16 GiB / 11.55 MiB.
    assert 0.85 * hbm / (11.55 * 2**20) <= per_chip <= hbm / (11.55 * 2**20)
    assert {m for _, _, m in seen} == {(False,), (True,)} and all(k == 1 for _, k, _ in seen)
    seen.clear()
    found = planner.largest_batch(config, "v5e:2x2", vocab_size=300, micro_per_chip=16, log=lambda _: None)
    per_chip = found // 4
    # Micro-batches of 16: the towers' 160 MiB is fixed, the block's 1 MiB per example grows.
    limit = (hbm / 1.05 / 2**20) - 160
    assert 0.85 * limit <= per_chip <= limit and per_chip % 16 == 0
    assert all(k == b // 16 for b, k, _ in seen)
