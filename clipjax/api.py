"""Load a trained dual encoder from a workdir, for notebooks, evaluation and downstream use.

    import clipjax
    model = clipjax.load("runs/demo")               # latest checkpoint
    img = model.encode_image(images_uint8)          # [N, d], unit norm
    txt = model.encode_text(["a red circle"])       # [M, d], unit norm
    probs = model.similarity(img, txt)               # cosine similarities x learned scale
    report = clipjax.api.evaluate_workdir("runs/demo", out="runs/demo/eval")

Nothing here imports the trainer: a workdir is read through its config.json and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from clipjax.checkpoint import Checkpointer, abstract_with_shardings
from clipjax.config import apply_overrides, config_from_dict
from clipjax.data.sources import make_source
from clipjax.evals.encoders import Encoders
from clipjax.evals.report import summary_lines, write_markdown, write_report
from clipjax.evals.runner import EvalRunner
from clipjax.models import model_factory
from clipjax.parallel import make_mesh, param_shardings


class RestoreError(ValueError):
    """A workdir, step or config that cannot be restored; the message is one line."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    if not os.path.isdir(workdir):
        raise RestoreError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise RestoreError(f"{path} not found: {workdir!r} is not a clipjax training workdir")
    with open(path) as f:
        return config_from_dict(json.load(f))


def eval_mesh(devices=None) -> jax.sharding.Mesh:
    """Pure data parallelism over the devices at hand, whatever mesh trained the model."""
    spec = ml_collections.ConfigDict({"axes": ("data", "fsdp", "model"), "shape": (-1, 1, 1)})
    return make_mesh(spec, devices=devices)


def restore_params(workdir: str, config, tokenizer, mesh, step: int | None = None):
    """(graphdef, params, step): parameters only, placed on `mesh` by the config's sharding rules."""
    checkpointer = Checkpointer(workdir)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RestoreError(f"no checkpoint in {checkpointer.directory}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise RestoreError(
                f"no checkpoint at step {step} in {checkpointer.directory} (steps: {sorted(steps)})"
            )
        abstract_model = nnx.eval_shape(model_factory(config, vocab_size=tokenizer.vocab_size))
        graphdef, _ = nnx.split(abstract_model)
        shardings = param_shardings(abstract_model, mesh, config.sharding_rules)
        expected = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        _check_compatible(checkpointer.params_metadata(step), expected, step)
        target = abstract_with_shardings(expected, shardings)
        params = checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()
    return graphdef, params, step


def _flat_by_name(tree) -> dict[str, Any]:
    # Orbax stores list indices as string keys: compare paths as names.
    def name(path):
        return "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!s}]" for k in path)

    return {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_compatible(saved, expected, step: int) -> None:
    flat_saved, flat_expected = _flat_by_name(saved), _flat_by_name(expected)
    for key in sorted(set(flat_saved) | set(flat_expected)):
        if key not in flat_saved:
            raise RestoreError(
                f"checkpoint {step} does not match the model config: it has no parameter params{key}"
            )
        if key not in flat_expected:
            raise RestoreError(
                f"checkpoint {step} does not match the model config: unexpected parameter params{key}"
            )
        if tuple(flat_saved[key].shape) != tuple(flat_expected[key].shape):
            raise RestoreError(
                f"checkpoint {step} does not match the model config: params{key} has shape "
                f"{tuple(flat_saved[key].shape)} in the checkpoint but {tuple(flat_expected[key].shape)} in the config"
            )


@dataclasses.dataclass
class TrainedModel:
    """A restored dual encoder. Inputs are numpy; outputs are numpy [N, d] unit-norm embeddings."""

    config: Any
    step: int
    tokenizer: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    params: Any
    batch_size: int = 256

    def __post_init__(self):
        self.encoders = Encoders(
            self.graphdef, self.params, self.mesh, self.tokenizer, batch_size=self.batch_size
        )

    def tokenize(self, strings: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(list(strings))

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] at the training resolution (or float in [0, 1])."""
        return self.encoders.image(images)

    def encode_text(self, strings: Sequence[str]) -> np.ndarray:
        return self.encoders.text(strings)

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Logits as the model was trained with: learned scale x cosine similarity (+ bias)."""
        logits = self.logit_scale * image_emb @ text_emb.T
        if "logit_bias" in self.params:
            logits = logits + float(np.asarray(self.params["logit_bias"]))
        return logits


def load(
    workdir: str, step: int | None = None, *, devices=None, config_overrides: dict | None = None
) -> TrainedModel:
    """Restore the parameters of a training run (latest checkpoint, or `step`) onto `devices`."""
    config = apply_overrides(load_run_config(workdir), config_overrides or {})
    mesh = eval_mesh(devices)
    tokenizer = make_source(config.data).tokenizer()
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step)
    return TrainedModel(
        config=config, step=step, tokenizer=tokenizer, mesh=mesh, graphdef=graphdef, params=params
    )


def evaluate_workdir(
    workdir: str, *, step: int | None = None, out: str | None = None, config=None, devices=None, log=print
) -> dict:
    """Run the config's evaluators on a checkpoint; write report.json and report.md to `out`
    (default: the workdir). `config` defaults to the run's own."""
    config = load_run_config(workdir) if config is None else config
    mesh = eval_mesh(devices)
    source = make_source(config.data)
    tokenizer = source.tokenizer()
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step)
    report = EvalRunner(config, source, tokenizer).run(graphdef, params, mesh, step)
    out = out or workdir
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        write_report(report, os.path.join(out, "report.json"))
        write_markdown(report, out, workdir)
        for line in summary_lines(report):
            log(line)
    return report
