"""Load a trained dual encoder from a workdir, for notebooks, evaluation and downstream use.

    import clipjax
    model = clipjax.load("runs/demo")               # latest checkpoint
    img = model.encode_image(images_uint8)          # [N, d], unit norm
    txt = model.encode_text(["a red circle"])       # [M, d], unit norm
    probs = model.similarity(img, txt)               # cosine similarities x learned scale
    report = clipjax.api.evaluate_workdir("runs/demo", out="runs/demo/eval")

Nothing here imports the trainer, and nothing reads the training data to use a checkpoint: the
config, the tokenizer and the preprocessing come from the checkpoint itself (checkpoints of the
first release, which lack them, fall back to config.json and the data). A checkpoint that cannot
be read is skipped for the newest one that can, with a warning that says why.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from clipjax import paths
from clipjax.checkpoint import Checkpointer, abstract_with_shardings, newest_readable, one_line
from clipjax.config import apply_overrides, config_from_dict
from clipjax.data.images import fit_crop, square_rgb
from clipjax.data.sources import make_source
from clipjax.data.tokenizers import tokenizer_from_json
from clipjax.evals.encoders import Encoders
from clipjax.evals.report import summary_lines, write_markdown, write_report
from clipjax.evals.runner import EvalRunner
from clipjax.models import model_factory
from clipjax.parallel import make_mesh, param_shardings
from clipjax.pretrained import preprocessing


class RestoreError(ValueError):
    """A workdir, step or config that cannot be restored; the message is one line."""


def _checked_workdir(workdir: str) -> Checkpointer:
    paths.refresh(workdir)  # a bucket's listings as they are now, not as this process last saw them
    if not paths.isdir(workdir):
        raise RestoreError(f"workdir {workdir!r} does not exist")
    if not paths.isdir(paths.join(workdir, "checkpoints")) and not paths.exists(
        paths.join(workdir, "config.json")
    ):
        raise RestoreError(f"{workdir!r} is not a clipjax training workdir (no checkpoints/, no config.json)")
    return Checkpointer(workdir, create=False)


def run_record(checkpointer: Checkpointer, *, log=print) -> tuple[dict | None, dict | None]:
    """(config dict, meta) of the run whose checkpoints these are: the newest checkpoint whose
    meta reads, or config.json beside first-release checkpoints; (None, None) without checkpoints.
    The trainer's resume check and the readers below share it."""
    steps = checkpointer.all_steps()
    if not steps:
        return None, None
    _, meta = newest_readable(steps, checkpointer.meta, log=log, what="metadata of checkpoint")
    if meta is not None:
        return meta["config"], meta
    path = paths.join(checkpointer.workdir, "config.json")
    if paths.exists(path):
        return json.loads(paths.read_text(path)), None
    return None, None


def read_run(workdir: str, *, log=print) -> tuple[ml_collections.ConfigDict, dict | None]:
    """(config, meta) of a workdir's run; config.json alone serves a workdir without checkpoints."""
    checkpointer = _checked_workdir(workdir)
    try:
        stored, meta = run_record(checkpointer, log=log)
    finally:
        checkpointer.close()
    if stored is None:
        path = paths.join(workdir, "config.json")
        if not paths.exists(path):
            raise RestoreError(f"{path} not found: {workdir!r} is not a clipjax training workdir")
        stored = json.loads(paths.read_text(path))
    return config_from_dict(stored), meta


def load_run_config(workdir: str, *, log=print) -> ml_collections.ConfigDict:
    """The run's config, as its newest readable checkpoint recorded it (or its config.json)."""
    return read_run(workdir, log=log)[0]


def run_tokenizer(meta: dict | None, source):
    """The tokenizer the run was trained with: from its checkpoint's meta, whatever the data says
    now, or (first-release checkpoints, `meta` None) rebuilt from the data `source`."""
    return tokenizer_from_json(meta["tokenizer"]) if meta else source.tokenizer()


def eval_mesh(devices=None) -> jax.sharding.Mesh:
    """Pure data parallelism over the devices at hand, whatever mesh trained the model."""
    spec = ml_collections.ConfigDict({"axes": ("data", "fsdp", "model"), "shape": (-1, 1, 1)})
    return make_mesh(spec, devices=devices)


def restore_params(
    workdir: str, config, tokenizer, mesh, step: int | None = None, *, parts: Sequence[str] = (), log=print
):
    """(graphdef, params, step): parameters only, placed on `mesh` by the config's sharding rules.

    Without `step`, the newest checkpoint that reads; unreadable ones are skipped with a warning.
    A checkpoint whose parameters do not fit `config.model` is an error, never skipped.

    `parts` (top-level names of the parameter tree: 'image_tower', 'image_proj', ...): only those
    are read, checked and returned (`params` then holds just them); the rest of the checkpoint
    may belong to another model.
    """
    checkpointer = _checked_workdir(workdir)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RestoreError(f"no checkpoint in {checkpointer.directory}")
        if step is not None and step not in steps:
            raise RestoreError(f"no checkpoint at step {step} in {checkpointer.directory} (steps: {steps})")
        abstract_model = nnx.eval_shape(model_factory(config, vocab_size=tokenizer.vocab_size))
        graphdef, _ = nnx.split(abstract_model)
        expected = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        target = abstract_with_shardings(
            expected, param_shardings(abstract_model, mesh, config.sharding_rules)
        )
        parts = tuple(dict.fromkeys(parts))
        unknown = [p for p in parts if p not in expected]
        if unknown:
            raise RestoreError(
                f"{unknown[0]!r} is not a part of the model (parts: {', '.join(sorted(expected))})"
            )
        if parts:
            expected = {p: expected[p] for p in parts}
            target = {p: target[p] for p in parts}
        for candidate in [step] if step is not None else reversed(steps):
            try:
                saved = checkpointer.params_metadata(candidate)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
                saved, error = None, e
            if saved is not None:
                if parts:
                    missing = [p for p in parts if p not in saved]
                    if missing:
                        raise RestoreError(
                            f"checkpoint {candidate} in {checkpointer.directory} has no part {missing[0]!r} "
                            f"(it has: {', '.join(sorted(saved))})"
                        )
                    saved = {p: saved[p] for p in parts}
                check_params_compatible(saved, expected, candidate)
                try:
                    return graphdef, checkpointer.restore_params(candidate, target), candidate
                except Exception as e:  # noqa: BLE001 - unreadable arrays: a damaged checkpoint
                    error = e
            if step is not None:
                raise RestoreError(
                    f"checkpoint {step} in {checkpointer.directory} cannot be read ({one_line(error)})"
                )
            log(
                f"WARNING: skipping checkpoint {candidate} in {checkpointer.directory}: it cannot be read ({one_line(error)})"
            )
        raise RestoreError(f"no checkpoint in {checkpointer.directory} can be read (steps: {steps})")
    finally:
        checkpointer.close()


def _flat_by_name(tree) -> dict[str, Any]:
    # Orbax stores list indices as string keys: compare paths as names.
    def name(path):
        return "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!s}]" for k in path)

    return {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_compatible(saved, expected, step: int) -> None:
    """RestoreError (one line) unless the saved parameter tree has the expected names and shapes."""
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


def _texts(strings) -> list[str]:
    if isinstance(strings, (str, bytes)):
        return [strings]
    texts = list(strings)
    bad = [t for t in texts if not isinstance(t, (str, bytes))]
    if bad:
        raise TypeError(f"encode_text: expected strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return texts


def prepare_images(images, image_size: int, resize: str = "crop") -> np.ndarray:
    """uint8 [N, S, S, 3] from the inputs `TrainedModel.encode_image` accepts (one-line errors)."""
    x = np.asarray(images)
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(
            f"encode_image: images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}"
        )
    if x.ndim == 1 and x.size == 0:  # an empty list: no images
        x = np.zeros((0, image_size, image_size, 3), np.uint8)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    # A 3-dim array ending in 3 is one RGB image; a grayscale batch of width 3 needs [N, H, 3, 1].
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3):
        x = x[None]
    if x.ndim == 3:  # [N, H, W] grayscale
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"encode_image: expected [N, H, W, 3], [N, H, W, 1], [N, H, W] or one image, got shape {x.shape}"
        )
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise ValueError("encode_image: images contain NaN or infinite values")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(
                f"encode_image: float images must lie in [0, 1], got values in [{x.min():g}, {x.max():g}] "
                "(pass uint8 for 0-255 pixels)"
            )
        x = np.round(x * 255.0)
    elif x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"encode_image: integer images must lie in [0, 255], got [{x.min()}, {x.max()}]")
    x = x.astype(np.uint8)
    if x.shape[1:3] == (image_size, image_size):
        return x
    fitted = [fit_image(im, image_size, resize) for im in x]
    return np.stack(fitted) if fitted else np.zeros((0, image_size, image_size, 3), np.uint8)


def fit_image(image: np.ndarray, image_size: int, resize: str = "crop") -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3] as the model's `image_resize` says: a reference's own
    preprocessing for converted models (clipjax.pretrained.preprocessing), else clipjax's, the
    evaluation pipeline's (the centre square, or the whole image for `squash`)."""
    im = Image.fromarray(image)
    if resize in preprocessing.RECIPES:
        return preprocessing.fit(im, image_size, resize)
    crop = fit_crop(resize)
    return square_rgb(im, image_size, box=crop(*im.size) if crop else None)


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

    def tokenize(self, strings: str | Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(_texts(strings))

    def encode_image(self, images) -> np.ndarray:
        """Images -> [N, d] unit-norm embeddings.

        Accepted: uint8 (or other integers) in [0, 255], or float in [0, 1]; [N, H, W, 3] RGB,
        [N, H, W, 1] or [N, H, W] grayscale, or one [H, W, 3] / [H, W] image; none ([] or
        [0, H, W, 3]: [0, d]). Any size, fitted as `model.image_resize` says: a converted model
        as its reference preprocesses (open_clip's or transformers' processor, pixel for pixel);
        a clipjax-trained one as the evaluation pipeline decodes images (shorter side to the
        training resolution, centre crop). NaN, infinite, bool, or float values outside [0, 1]
        are rejected with one line.
        """
        return self.encoders.image(
            prepare_images(
                images, int(self.config.data.image_size), self.config.model.get("image_resize", "crop")
            )
        )

    def encode_text(self, strings: str | Sequence[str]) -> np.ndarray:
        """A string or a list of strings -> [N, d] unit-norm embeddings ([0, d] for none)."""
        texts = _texts(strings)
        if not texts:
            return np.zeros((0, int(self.config.model.embed_dim)), np.float32)
        return self.encoders.text(texts)

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
    config, meta = read_run(workdir)
    config = apply_overrides(config, config_overrides or {})
    mesh = eval_mesh(devices)
    tokenizer = run_tokenizer(meta, make_source(config.data))  # the source is read only without meta
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step)
    return TrainedModel(
        config=config, step=step, tokenizer=tokenizer, mesh=mesh, graphdef=graphdef, params=params
    )


def evaluate_workdir(
    workdir: str, *, step: int | None = None, out: str | None = None, config=None, devices=None, log=print
) -> dict:
    """Run the config's evaluators on a checkpoint; write report.json and report.md to `out`
    (default: the workdir). `config` defaults to the run's own."""
    stored, meta = read_run(workdir, log=log)
    config = stored if config is None else config
    mesh = eval_mesh(devices)
    # The data source is read only by the evaluators that need held-out data (and, for
    # first-release checkpoints, to rebuild the tokenizer).
    source = make_source(config.data)
    tokenizer = run_tokenizer(meta, source)
    graphdef, params, step = restore_params(workdir, config, tokenizer, mesh, step, log=log)
    report = EvalRunner(config, source, tokenizer, log=log).run(graphdef, params, mesh, step)
    out = out or workdir
    if jax.process_index() == 0:
        paths.makedirs(out)
        write_report(report, paths.join(out, "report.json"))
        write_markdown(report, out, workdir)
        for line in summary_lines(report):
            log(line)
    return report
