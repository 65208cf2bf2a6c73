"""clipjax: sharded contrastive pre-training in JAX / Flax NNX."""

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, **kwargs):
    """Restore a trained model from a workdir: see `clipjax.api.load`."""
    from clipjax.api import load as _load

    return _load(workdir, step, **kwargs)
