"""The real train step with the embedding metrics on stays within 2x the memory of the step
without them at a batch the ring loss exists for (compiled only: nothing is allocated)."""

import pathlib

from clipjax.cli import load_config_file
from clipjax.config import apply_overrides
from clipjax.parallel import make_mesh
from clipjax.planning.compile import compile_train_steps

GLOBAL_BATCH, DIM = 65_536, 512
GiB = 2**30
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _temp_bytes(config, with_metrics: bool) -> int:
    # The train step on the abstract state, as `clipjax.plan` compiles it: nothing is allocated.
    mesh = make_mesh(config.mesh)
    step = compile_train_steps(config, mesh, vocab_size=64, metrics=(with_metrics,))[with_metrics]
    return step.memory.temporaries


def test_metrics_step_memory_at_65536_by_512_on_8_devices():
    config = load_config_file(str(ROOT / "configs" / "demo.py") + ":tiny")
    apply_overrides(
        config,
        {
            "data.batch_size": GLOBAL_BATCH,
            "data.image_size": 8,
            "data.tokenizer.max_len": 4,
            "model.embed_dim": DIM,
            "loss.impl": "ring",
        },
    )
    without = _temp_bytes(config, with_metrics=False)
    with_metrics = _temp_bytes(config, with_metrics=True)
    print(f"per-device temp: {without / GiB:.3f} GiB without metrics, {with_metrics / GiB:.3f} GiB with")
    assert with_metrics <= 2 * without, (with_metrics / GiB, without / GiB)
