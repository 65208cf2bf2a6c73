"""The real train step with the embedding metrics on stays within 2x the memory of the step
without them at a batch the ring loss exists for (compiled only: nothing is allocated)."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import pathlib

from clipjax.cli import load_config_file
from clipjax.config import apply_overrides
from clipjax.parallel import batch_axes, make_mesh
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_train_step

GLOBAL_BATCH, DIM = 65_536, 512
GiB = 2**30
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _temp_bytes(config, with_metrics: bool) -> int:
    mesh = make_mesh(config.mesh)
    initial = init_train_state(config, mesh, vocab_size=64)
    step = make_train_step(config, mesh, initial.graphdef, initial.shardings, initial.tx, initial.schedule)
    rows = NamedSharding(mesh, P(batch_axes(mesh)))
    size, length = config.data.image_size, config.data.tokenizer.max_len
    batch = {
        "image": jax.ShapeDtypeStruct((GLOBAL_BATCH, size, size, 3), jnp.uint8, sharding=rows),
        "text": jax.ShapeDtypeStruct((GLOBAL_BATCH, length), jnp.int32, sharding=rows),
        "text_id": jax.ShapeDtypeStruct((GLOBAL_BATCH,), jnp.int32, sharding=rows),
        "label": jax.ShapeDtypeStruct((GLOBAL_BATCH,), jnp.int32, sharding=rows),
    }
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial.state)
    compiled = step.lower(state, batch, with_metrics).compile()
    return compiled.memory_analysis().temp_size_in_bytes


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
