"""The collapse alarm in a real run: it fires (and halts) without negatives, and stays quiet on the demo."""

import json

from tests.helpers import load_config


def _run(tmp_path, data_dir, loss_name):
    from clipjax import trainer as train_lib

    c = load_config("demo.py")
    c.data.data_dir = data_dir
    c.steps = 40
    c.log_every = 10
    c.checkpoint_every = 100
    c.loss.name = loss_name
    c.metrics.every = 2
    c.metrics.halt_on_collapse = True
    c.evals.at_end = False
    # Judge from step 20 on: in the first steps of a 32-example batch the rank of the random
    # initialisation falls as colours are learned, which is learning, not collapse.
    c.metrics.alarm_start_step = 20
    lines = []
    train_lib.train(c, str(tmp_path), log=lines.append)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    return records, lines


def test_alarm_fires_and_halts_without_negatives(tmp_path, tfds_dir):
    records, lines = _run(tmp_path, tfds_dir, "alignment")
    warnings = [line for line in lines if line.startswith("WARNING") and "collapse" in line]
    assert warnings, lines
    assert any(r.get("collapse_alarm") == 1 for r in records)
    last = records[-1]["step"]
    assert last < 40, "halt_on_collapse should stop the run early"
    from clipjax.checkpoint import Checkpointer

    assert Checkpointer(str(tmp_path)).latest_step() == last
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_no_false_alarm_on_the_demo_objective(tmp_path, tfds_dir):
    records, lines = _run(tmp_path, tfds_dir, "softmax")
    assert not [line for line in lines if line.startswith("WARNING")], lines
    measured = [r for r in records if "img_effective_rank" in r]
    assert len(measured) == 20 and all(r["collapse_alarm"] == 0 for r in measured)
    assert min(r["img_effective_rank"] for r in measured if r["step"] >= 20) > 3
