r"""Samples/s and MFU of clipjax's real train step, next to a plain-JAX reference and open_clip.

    python benchmarks/train_throughput.py                          # the openclip_compare preset
    python benchmarks/train_throughput.py --config configs/demo.py --set data.batch_size=128
    python benchmarks/train_throughput.py --configs openclip_compare configs/clip_vit_b16.py:tiny
    python benchmarks/train_throughput.py --config configs/clip_vit_b16.py --batch 256   # on a GPU
    python benchmarks/train_throughput.py --steps 10 --warmup 2 --json runs/throughput.json

What is timed, per config, in one process:

  clipjax      `clipjax.trainer.step.make_train_step` on the state of `init_train_state`, on the
               mesh of `config.mesh`, with a batch placed by `host_batch_to_global`: exactly the
               program `clipjax.train` runs on a step without embedding metrics.
  plain JAX    the same two towers, loss and optimizer written here with jax.numpy / jax.nn only:
               parameters in dicts, a Python loop over layers (no flax, no scan), B x B logits,
               symmetric InfoNCE with a learnable temperature, optax AdamW (with the config's
               gradient clipping and weight-decay rule). Only for a ViT image tower
               (model.image.kind='vit', pool cls or mean) with the text Transformer, the softmax
               loss, AdamW and no micro-batches; other configs print why it is skipped. It runs
               the batch data-parallel over the same devices (params replicated, jit's automatic
               partitioning). "overhead" = clipjax step time / this step time - 1.
  open_clip    `open_clip.CLIP` built with the same sizes (`CLIPVisionCfg`, `CLIPTextCfg`),
               `open_clip.ClipLoss`, torch AdamW, `torch.set_num_threads(os.cpu_count())`; on
               the GPU when JAX runs on one, else on the CPU; only with a single JAX device.
               Skipped, with the reason, when torch or open_clip do not import.

What the overhead holds: what clipjax's step does beyond the model, loss and update (the
non-finite guard over parameters and optimizer state, the gradient and parameter norms it
reports), and how it does the rest (layers unrolled by default, under an `nnx.scan` loop with
`--set model.unroll=1`; the loss inside `shard_map` as `loss.impl` says: `ring` by default,
`--set loss.impl=gather` for all-gathered logits).

open_clip on a bfloat16 config runs under torch.autocast(bfloat16). On a GPU it is told to use
TF32 for float32 matmuls (torch.set_float32_matmul_precision("high")), as XLA does by default;
and JAX is asked for half the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.5, unless set)
instead of 75%, to leave torch room in the same process.

Every runner first compiles (its first step, reported as "first step"), runs `--warmup` more
untimed steps, then `--steps` timed steps interleaved across the runners (each round in a
rotated order, every step ended by `jax.block_until_ready` / a device sync), and reports the
median. The batch is synthetic (uniform uint8 images; captions of random length ending in the
highest token id, pads 0 after it) and the same for all runners, so no input pipeline is timed.

The first loss ("loss@0", before any update) of every runner should be near log(batch), the
loss of embeddings that carry no information; with CLIP's initial temperature (logit scale
1/0.07) it sits a little above, by about half the variance of the random initial logits.

FLOPs per step come from `clipjax.flops.train_flops_per_step(config)` and are used for all three
columns (same architecture); MFU divides the FLOP/s per device by
`clipjax.flops.peak_flops_per_device(device_kind, --peak-tflops)`, which knows no CPU peak.

The `openclip_compare` preset (the default) is one architecture in all three: ViT on 32 px
images, patch 4, width 128, depth 4, 4 heads, MLP 512, class-token pooling; a causal text
Transformer with context 32, vocabulary 512, width 128, depth 4, 4 heads, MLP 512, pooled at the
end-of-text token (clipjax `pool='last'`, the last real token; open_clip `pool_type='argmax'`,
the highest token id: the same position on these captions); embedding 128; global batch 256;
float32; AdamW with clipping at norm 1. Parameter counts differ by design in two places:
open_clip's attention has a key bias (nn.MultiheadAttention's in_proj_bias; clipjax drops it
because softmax cancels it: it would never get a gradient) and its patch convolution has no
bias, so open_clip has (width x layers of both towers) - width = 1024 - 128 = 896 more. GELU
(tanh form) and LayerNorm epsilon (1e-6) are set to clipjax's in open_clip.

Several JAX devices on a CPU (to try a mesh):
XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/train_throughput.py ...

open_clip comparison: setup
---------------------------
In the project's virtual environment (none of this is a clipjax dependency; do not add torch to
pyproject.toml):

    pip install torch==2.13.0          # the CPU wheel; a bare `torch` pulls a multi-GB CUDA build
    pip install --no-deps open_clip_torch==3.3.0 ftfy regex tqdm huggingface_hub safetensors timm
    pip install --no-deps wcwidth      # ftfy imports it
    pip install --no-deps torchvision==0.28.0

timm is installed with --no-deps because it requires torch and torchvision (it would pull a
different torch). `import torchvision` then fails with "operator torchvision::nms does not
exist": in the venv's site-packages/torchvision/_meta_registrations.py the decorators
`@torch.library.register_fake("torchvision::nms")` and `("torchvision::qnms")` are not guarded
by `torchvision.extension._has_ops()` as the others are. Guard them:

    f=$(python -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
    sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$f/_meta_registrations.py"

huggingface_hub then prints "Error importing huggingface_hub.hf_api ..." on import (its own
optional dependencies are missing); harmless here, as nothing is downloaded, and this script
hides that output.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from clipjax.cli import check_override_keys, load_config_file  # noqa: E402
from clipjax.config import ConfigError, apply_overrides, default_config, total_steps, validate  # noqa: E402
from clipjax.models import model_spec  # noqa: E402
from clipjax.parallel import host_batch_to_global, make_mesh  # noqa: E402
from clipjax.trainer.state import init_train_state  # noqa: E402
from clipjax.trainer.step import STEP_INPUTS, make_train_step  # noqa: E402

DEFAULT_PRESET = "openclip_compare"
SETUP_HEADING = "open_clip comparison: setup"


def openclip_compare_config():
    """The architecture compared with open_clip (see the module docstring), as a clipjax config."""
    c = default_config()
    c.steps = 1000  # only shapes the learning-rate schedule; nothing here runs that long
    c.data.name = "shapes"  # never read: batches are synthetic
    c.data.batch_size = 256
    c.data.image_size = 32
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.vocab_size = 512
    c.data.tokenizer.max_len = 32
    c.model.image.kind = "vit"
    c.model.image.patch_size = 4
    c.model.image.width = 128
    c.model.image.depth = 4
    c.model.image.heads = 4
    c.model.image.mlp_dim = 512
    c.model.image.pool = "cls"
    c.model.text.width = 128
    c.model.text.depth = 4
    c.model.text.heads = 4
    c.model.text.mlp_dim = 512
    c.model.text.causal = True
    c.model.text.pool = "last"
    c.model.embed_dim = 128
    c.model.dtype = "float32"
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.2
    return c


PRESETS: dict[str, Callable[[], Any]] = {DEFAULT_PRESET: openclip_compare_config}


# ---------------------------------------------------------------------------------- configs


def parse_value(text: str) -> Any:
    """A command-line value as Python: 3, 0.5, True, (1, 2), 'gather' (bare words stay strings)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Config keys naming the data to read, which the benchmark does not read.
DATA_KEYS = ("data.source", "data.data_dir", "data.tokenizer.model_file", "evals")


def load_config(spec: str, overrides: dict[str, Any], batch: int | None):
    """A preset name or `file.py[:arg]`, with dotted-key overrides and the batch size applied;
    returns (config, a note on what was not checked or None)."""
    config = PRESETS[spec]() if spec in PRESETS else load_config_file(spec)
    # The same key check as `clipjax.train` gives `--config.KEY=...`: one line naming the key.
    check_override_keys([f"--config.{k}" for k in overrides], config)
    apply_overrides(config, dict(overrides))
    if batch:
        config.data.batch_size = int(batch)
    try:
        validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    except ConfigError as e:
        # The data section names a dataset to read; this benchmark feeds synthetic batches, so a
        # config pointing at data that is not on this machine (configs/clip_vit_b16.py) is fine.
        # `validate` checks the model, mesh and batch size before it looks at the data.
        if not str(e).startswith(DATA_KEYS):
            raise
        return config, f"not checked (batches are synthetic): {e}"
    return config, None


def vocab_size(config, override: int = 0) -> int:
    """The text tower's vocabulary without reading data: byte tokenizer 259; sentencepiece the
    configured size (an upper bound of what training the tokenizer on captions gives)."""
    if override:
        return int(override)
    if config.data.tokenizer.kind == "byte":
        return 256 + 3  # clipjax.data.tokenizers.ByteTokenizer: 256 bytes after pad, bos, eos
    return int(config.data.tokenizer.vocab_size)


def remat_policy(value) -> str:
    """`model.remat` as a policy name; older configs say True / False."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return str(value)


def describe(name: str, config, spec, vocab: int) -> str:
    i, t = spec.image, spec.text
    if spec.image_kind == "vit":
        image = (
            f"ViT {config.data.image_size}px patch {i.patch_size} w{i.width} d{i.depth} h{i.heads} "
            f"mlp{i.mlp_dim} pool={i.pool}"
        )
    else:
        image = f"{spec.image_kind} {config.data.image_size}px"
    text = (
        f"text L{config.data.tokenizer.max_len} V{vocab} w{t.width} d{t.depth} h{t.heads} mlp{t.mlp_dim}"
        f"{' causal' if t.causal else ''} pool={t.pool}"
    )
    return (
        f"{name}: {image} | {text} | embed {spec.embed_dim} | {spec.dtype}, remat "
        f"{remat_policy(spec.remat)}, attention {getattr(spec, 'attention', 'xla')} | loss "
        f"{config.loss.name}/{config.loss.impl} | {config.optim.name} clip {config.optim.clip_norm} | "
        f"batch {config.data.batch_size}"
    )


def synthetic_batch(config, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One global batch as the data pipeline gives it: uint8 images, right-padded token ids.

    Each caption ends in the highest id (vocab - 1) with pads (0) after it, so open_clip's
    argmax-token pooling and clipjax's last-real-token pooling read the same position.
    """
    rng = np.random.default_rng(seed)
    b, s, length = (
        int(config.data.batch_size),
        int(config.data.image_size),
        int(config.data.tokenizer.max_len),
    )
    text = np.zeros((b, length), np.int32)
    lengths = rng.integers(max(2, length // 4), length + 1, size=b)
    for row, n in enumerate(lengths):
        text[row, : n - 1] = rng.integers(1, vocab - 1, size=n - 1)
        text[row, n - 1] = vocab - 1
    return {
        "image": rng.integers(0, 256, size=(b, s, s, 3), dtype=np.uint8),
        "text": text,
        "text_id": np.arange(b, dtype=np.int32),
        "label": (np.arange(b) % 10).astype(np.int32),
    }


def count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------- runners


class Skip(Exception):
    """A runner that does not apply to this config or machine; the message says why."""


class ClipjaxRunner:
    name = "clipjax"

    def __init__(self, config, vocab: int, batch: dict[str, np.ndarray]):
        mesh = make_mesh(config.mesh)
        initial = init_train_state(config, mesh, vocab_size=vocab)
        self.step_fn = make_train_step(
            config, mesh, initial.graphdef, initial.shardings, initial.tx, initial.schedule
        )
        self.state = initial.state
        self.batch = host_batch_to_global({k: batch[k] for k in STEP_INPUTS if k in batch}, mesh)
        self.params = count(self.state["params"])
        self.devices = mesh.size
        self.label = "clipjax train step"
        self.mesh = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())

    def step(self) -> Callable[[], float]:
        # with_metrics=False: the step clipjax.train runs on all but every `metrics.every`-th step.
        self.state, metrics = self.step_fn(self.state, self.batch, False)
        jax.block_until_ready((self.state, metrics))
        return lambda: float(metrics["loss"])


# CLIP's RGB statistics, in [0, 1] units: what `normalize_images` does inside clipjax's step.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}


def reference_support(config, spec) -> str | None:
    """Why the plain-JAX reference cannot run this config, or None."""
    if spec.image_kind != "vit":
        return f"it implements only the ViT image tower (model.image.kind='vit'), not {spec.image_kind!r}"
    if spec.image.pool not in ("cls", "mean"):
        return f"ViT pool {spec.image.pool!r} (it implements 'cls' and 'mean')"
    if config.loss.name != "softmax":
        return f"loss {config.loss.name!r} (it implements the softmax InfoNCE loss)"
    if config.optim.name != "adamw":
        return f"optimizer {config.optim.name!r} (it implements AdamW)"
    if int(config.microbatches) > 1:
        return "microbatches > 1 (it has no GradCache)"
    if jax.process_count() > 1:
        return "several processes (it runs in one)"
    return None


def _normal(key, shape, std):
    return std * jax.random.normal(key, shape, jnp.float32)


def _block_params(key, width: int, mlp_dim: int) -> dict[str, jax.Array]:
    k = jax.random.split(key, 4)
    return {
        "ln1_scale": jnp.ones((width,)),
        "ln1_bias": jnp.zeros((width,)),
        # Q, K and V in one matrix, one matmul. Biases on Q and V only: a key bias adds the same
        # amount to every logit of a query row, which the softmax cancels (as in clipjax).
        "qkv": _normal(k[0], (width, 3 * width), width**-0.5),
        "q_bias": jnp.zeros((width,)),
        "v_bias": jnp.zeros((width,)),
        "out": _normal(k[1], (width, width), width**-0.5),
        "out_bias": jnp.zeros((width,)),
        "ln2_scale": jnp.ones((width,)),
        "ln2_bias": jnp.zeros((width,)),
        "fc1": _normal(k[2], (width, mlp_dim), width**-0.5),
        "fc1_bias": jnp.zeros((mlp_dim,)),
        "fc2": _normal(k[3], (mlp_dim, width), mlp_dim**-0.5),
        "fc2_bias": jnp.zeros((width,)),
    }


def reference_params(key, spec, *, vocab: int, max_len: int, image_size: int) -> dict:
    vit, txt = spec.image, spec.text
    patch_in = vit.patch_size**2 * 3
    tokens = (image_size // vit.patch_size) ** 2 + (1 if vit.pool == "cls" else 0)
    keys = iter(jax.random.split(key, 8 + vit.depth + txt.depth))
    image = {
        "patch": _normal(next(keys), (patch_in, vit.width), patch_in**-0.5),
        "patch_bias": jnp.zeros((vit.width,)),
        "pos": _normal(next(keys), (tokens, vit.width), 0.02),
        "blocks": [_block_params(next(keys), vit.width, vit.mlp_dim) for _ in range(vit.depth)],
        "ln_scale": jnp.ones((vit.width,)),
        "ln_bias": jnp.zeros((vit.width,)),
    }
    if vit.pool == "cls":
        image["cls"] = _normal(next(keys), (vit.width,), 0.02)
    text = {
        "embed": _normal(next(keys), (vocab, txt.width), 0.02),
        "pos": _normal(next(keys), (max_len, txt.width), 0.02),
        "blocks": [_block_params(next(keys), txt.width, txt.mlp_dim) for _ in range(txt.depth)],
        "ln_scale": jnp.ones((txt.width,)),
        "ln_bias": jnp.zeros((txt.width,)),
    }
    return {
        "image": image,
        "text": text,
        "image_proj": _normal(next(keys), (vit.width, spec.embed_dim), vit.width**-0.5),
        "text_proj": _normal(next(keys), (txt.width, spec.embed_dim), txt.width**-0.5),
        "logit_scale": jnp.asarray(spec.logit_scale_init, jnp.float32),
    }


def reference_params_from_clipjax(params: dict) -> dict:
    """clipjax's parameters (`nnx.to_pure_dict` of a DualEncoder with a ViT) in this layout.

    Not used for timing (each side initialises its own); it lets a test show that the two compute
    the same function, hence the same FLOPs, from the same weights.
    """

    def blocks(stack: dict) -> list[dict]:
        attn, mlp = stack["attn"], stack["mlp"]
        depth, width = attn["query"].shape[:2]
        flat = lambda x: x.reshape(x.shape[0], width, width)  # [L, d, heads, head_dim] -> [L, d, d]
        qkv = jnp.concatenate([flat(attn["query"]), flat(attn["key"]), flat(attn["value"])], axis=-1)
        return [
            {
                "ln1_scale": stack["ln1"]["scale"][i],
                "ln1_bias": stack["ln1"]["bias"][i],
                "qkv": qkv[i],
                "q_bias": attn["query_bias"][i].reshape(width),
                "v_bias": attn["value_bias"][i].reshape(width),
                "out": attn["out"][i].reshape(width, width),
                "out_bias": attn["out_bias"][i],
                "ln2_scale": stack["ln2"]["scale"][i],
                "ln2_bias": stack["ln2"]["bias"][i],
                "fc1": mlp["fc1"]["kernel"][i],
                "fc1_bias": mlp["fc1"]["bias"][i],
                "fc2": mlp["fc2"]["kernel"][i],
                "fc2_bias": mlp["fc2"]["bias"][i],
            }
            for i in range(depth)
        ]

    im, tx = params["image_tower"], params["text_tower"]
    kernel = im["patch"]["kernel"]  # HWIO, flattened in the (row, col, channel) order of the patches
    image = {
        "patch": kernel.reshape(-1, kernel.shape[-1]),
        "patch_bias": im["patch"]["bias"],
        "pos": im["pos"],
        "blocks": blocks(im["encoder"]["blocks"]),
        "ln_scale": im["norm"]["scale"],
        "ln_bias": im["norm"]["bias"],
    }
    if im.get("cls") is not None:
        image["cls"] = im["cls"]
    text = {
        "embed": tx["embed"],
        "pos": tx["pos"],
        "blocks": blocks(tx["encoder"]["blocks"]),
        "ln_scale": tx["norm"]["scale"],
        "ln_bias": tx["norm"]["bias"],
    }
    return {
        "image": image,
        "text": text,
        "image_proj": params["image_proj"]["kernel"],
        "text_proj": params["text_proj"]["kernel"],
        "logit_scale": params["logit_scale"],
    }


def layer_norm(x, scale, bias, dtype):
    # Statistics in float32 whatever the compute dtype, as clipjax does.
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias).astype(dtype)


def attention(p, x, mask, heads: int, dtype, impl: str):
    b, t, w = x.shape
    hd = w // heads
    qkv = x @ p["qkv"].astype(dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = (q + p["q_bias"].astype(dtype)).reshape(b, t, heads, hd)
    k = k.reshape(b, t, heads, hd)
    v = (v + p["v_bias"].astype(dtype)).reshape(b, t, heads, hd)
    if impl == "dot_product_attention":
        ctx = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(hd**-0.5, dtype), k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(dtype), v)
    return ctx.reshape(b, t, w) @ p["out"].astype(dtype) + p["out_bias"].astype(dtype)


def block(p, x, mask, heads: int, dtype, impl: str):
    x = x + attention(p, layer_norm(x, p["ln1_scale"], p["ln1_bias"], dtype), mask, heads, dtype, impl)
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"], dtype)
    h = jax.nn.gelu(h @ p["fc1"].astype(dtype) + p["fc1_bias"].astype(dtype))
    return x + h @ p["fc2"].astype(dtype) + p["fc2_bias"].astype(dtype)


def encoder(blocks, x, mask, heads: int, dtype, impl: str, remat: str):
    run = lambda p, x, mask: block(p, x, mask, heads, dtype, impl)
    if remat != "none":
        # The same recomputation as clipjax's `model.remat`, one block at a time.
        policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
        run = jax.checkpoint(run, policy=policy)
    for p in blocks:  # a Python loop: every layer is its own code in the compiled program
        x = run(p, x, mask)
    return x


def l2_normalize(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


def reference_loss(params, batch, spec, precision):
    dtype, impl, remat = (
        jnp.dtype(spec.dtype),
        getattr(spec, "attention", "xla"),
        remat_policy(spec.remat),
    )
    vit, txt = spec.image, spec.text

    images = (batch["image"].astype(jnp.float32) / 255.0 - jnp.array(CLIP_MEAN)) / jnp.array(CLIP_STD)
    b, s, _, c = images.shape
    p = vit.patch_size
    patches = images.astype(dtype).reshape(b, s // p, p, s // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    im = params["image"]
    x = patches.reshape(b, (s // p) ** 2, p * p * c) @ im["patch"].astype(dtype) + im["patch_bias"].astype(
        dtype
    )
    if vit.pool == "cls":
        x = jnp.concatenate([jnp.broadcast_to(im["cls"].astype(dtype), (b, 1, vit.width)), x], axis=1)
    x = encoder(im["blocks"], x + im["pos"].astype(dtype), None, vit.heads, dtype, impl, remat)
    x = layer_norm(x, im["ln_scale"], im["ln_bias"], dtype)
    x = x[:, 0] if vit.pool == "cls" else x.astype(jnp.float32).mean(1)
    img = l2_normalize(x.astype(jnp.float32) @ params["image_proj"])

    tokens = batch["text"]
    length = tokens.shape[1]
    tp = params["text"]
    valid = tokens != 0
    mask = valid[:, None, None, :]  # pad keys masked: the output does not depend on the padding
    if txt.causal:
        mask = mask & jnp.tril(jnp.ones((length, length), bool))
    y = jnp.take(tp["embed"], tokens, axis=0).astype(dtype) + tp["pos"][:length].astype(dtype)
    y = layer_norm(
        encoder(tp["blocks"], y, mask, txt.heads, dtype, impl, remat), tp["ln_scale"], tp["ln_bias"], dtype
    )
    if txt.pool == "first":
        y = y[:, 0]
    elif txt.pool == "last":
        last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
        y = jnp.take_along_axis(y, last[:, None, None], axis=1)[:, 0]
    else:
        w = valid.astype(jnp.float32)[..., None]
        y = (y.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    tx = l2_normalize(y.astype(jnp.float32) @ params["text_proj"])

    logits = jnp.exp(params["logit_scale"]) * jnp.matmul(img, tx.T, precision=precision)
    labels = jnp.arange(b)
    return 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )


class ReferenceRunner:
    name = "plain JAX"

    def __init__(self, config, spec, vocab: int, batch: dict[str, np.ndarray]):
        why = reference_support(config, spec)
        if why:
            raise Skip(why)
        o = config.optim
        total = total_steps(config)
        warmup = int(round(o.warmup_fraction * total)) if o.warmup_fraction > 0 else int(o.warmup_steps)
        warmup = min(warmup, max(total - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.lr, warmup, max(total, warmup + 1), end_value=o.lr * o.end_lr_fraction
        )
        params = reference_params(
            jax.random.key(config.seed),
            spec,
            vocab=vocab,
            max_len=int(config.data.tokenizer.max_len),
            image_size=int(config.data.image_size),
        )
        # Decay matrices, tables and position embeddings; not biases, norms, class token, scale.
        decay = jax.tree.map(lambda x: x.ndim >= 2, params)
        adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay)
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw
        devices = jax.devices()
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(params, replicated)
        self.state = (params, jax.jit(tx.init, out_shardings=replicated)(params))
        self.batch = jax.device_put({k: batch[k] for k in ("image", "text")}, NamedSharding(mesh, P("batch")))
        precision = PRECISIONS[config.loss.precision]
        scale_max = float(config.model.logit_scale_max)

        def step(state, batch):
            params, opt_state = state
            loss, grads = jax.value_and_grad(reference_loss)(params, batch, spec, precision)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, scale_max)
            return (params, opt_state), loss

        self.step_fn = jax.jit(step, donate_argnums=(0,), out_shardings=replicated)
        self.params = count(params)
        self.devices = len(devices)
        self.label = "plain JAX reference" + (f" ({len(devices)} devices)" if len(devices) > 1 else "")

    def step(self) -> Callable[[], float]:
        self.state, loss = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, loss))
        return lambda: float(loss)


def import_open_clip():
    """(torch, open_clip), or Skip with the reason."""
    try:
        # huggingface_hub prints its own missing optional modules on import (see the docstring).
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import open_clip
            import torch
    except Exception as e:  # noqa: BLE001 - any import failure means: no comparison, say why
        raise Skip(f"torch / open_clip do not import ({type(e).__name__}: {e}); see 'setup' in --help")
    return torch, open_clip


class OpenClipRunner:
    name = "open_clip"

    def __init__(self, config, spec, vocab: int, batch: dict[str, np.ndarray]):
        if spec.image_kind != "vit" or spec.image.pool != "cls":
            raise Skip("it is compared only on a ViT image tower with class-token pooling")
        if spec.text.pool != "last":
            raise Skip(f"text pool {spec.text.pool!r} has no open_clip equivalent ('last' maps to 'argmax')")
        if config.loss.name != "softmax" or config.optim.name != "adamw" or int(config.microbatches) > 1:
            raise Skip("it is compared only with the softmax loss, AdamW and no micro-batches")
        if jax.device_count() > 1:
            raise Skip(f"it runs on one device; JAX has {jax.device_count()}")
        torch, open_clip = import_open_clip()
        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        if cuda:
            torch.set_float32_matmul_precision("high")  # TF32, as XLA's default on GPUs
        torch.manual_seed(int(config.seed))
        vit, txt = spec.image, spec.text
        # clipjax's GELU is the tanh form and its LayerNorm epsilon 1e-6: the same in open_clip.
        same_ops = dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
        vision_cfg = open_clip.CLIPVisionCfg(
            layers=vit.depth,
            width=vit.width,
            head_width=vit.width // vit.heads,
            mlp_ratio=vit.mlp_dim / vit.width,
            patch_size=vit.patch_size,
            image_size=int(config.data.image_size),
            no_ln_pre=True,  # clipjax's ViT has no LayerNorm before the blocks
            pool_type="tok",
            **same_ops,
        )
        text_cfg = open_clip.CLIPTextCfg(
            context_length=int(config.data.tokenizer.max_len),
            vocab_size=vocab,
            width=txt.width,
            heads=txt.heads,
            layers=txt.depth,
            mlp_ratio=txt.mlp_dim / txt.width,
            no_causal_mask=not txt.causal,
            pool_type="argmax",
            **same_ops,
        )
        model = open_clip.CLIP(
            spec.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_scale=spec.logit_scale_init
        )
        self.model = model.to(self.device).train()
        if remat_policy(spec.remat) != "none":
            model.set_grad_checkpointing(True)
        self.autocast = spec.dtype == "bfloat16"
        self.loss_fn = open_clip.ClipLoss()
        o = config.optim
        # open_clip's own training rule: no weight decay on 1-D parameters (biases, norms, the
        # class token, the temperature); the same split as clipjax's weight-decay mask.
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=o.eps,
        )
        self.clip_norm = float(o.clip_norm)
        self.scale_max = float(config.model.logit_scale_max)
        self.images = torch.from_numpy(batch["image"]).to(self.device)
        self.text = torch.from_numpy(batch["text"]).long().to(self.device)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device)
        self.std = torch.tensor(CLIP_STD, device=self.device)
        self.params = int(sum(p.numel() for p in model.parameters()))
        self.devices = 1
        autocast = ", bf16 autocast" if self.autocast else ""
        self.label = f"open_clip {open_clip.__version__} (torch {torch.__version__}, {self.device}{autocast})"

    def step(self) -> Callable[[], float]:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            # The uint8 -> normalised float conversion is inside clipjax's step too.
            images = ((self.images.float() / 255.0 - self.mean) / self.std).permute(0, 3, 1, 2)
            img, txt, scale = self.model(images, self.text)
            loss = self.loss_fn(img, txt, scale)
        loss.backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.scale_max)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return lambda: float(loss.detach())


# ---------------------------------------------------------------------------------- timing


def build_runners(config, spec, vocab, batch, *, reference: bool, openclip: bool, log):
    """(the runners that apply, {name: why skipped} for the others)."""
    runners, skipped = [], {}
    wanted = [(ClipjaxRunner, lambda: ClipjaxRunner(config, vocab, batch))]
    if reference:
        wanted.append((ReferenceRunner, lambda: ReferenceRunner(config, spec, vocab, batch)))
    else:
        skipped[ReferenceRunner.name] = "--no-reference"
    if openclip:
        wanted.append((OpenClipRunner, lambda: OpenClipRunner(config, spec, vocab, batch)))
    else:
        skipped[OpenClipRunner.name] = "--no-openclip"
    for cls, make in wanted:
        try:
            runners.append(make())
        except Skip as e:
            skipped[cls.name] = str(e)
    for name, why in skipped.items():
        log(f"  {name}: skipped: {why}")
    return runners, skipped


def time_runners(runners: list, *, steps: int, warmup: int) -> dict[str, dict]:
    """First step (compiles), `warmup` untimed steps, then `steps` timed rounds, interleaved."""
    out = {}
    for r in runners:
        start = time.perf_counter()
        first_loss = r.step()()
        out[r.name] = {"first_step_s": time.perf_counter() - start, "loss_step0": first_loss, "times": []}
        for _ in range(warmup):
            r.step()
    for i in range(steps):
        # A rotated order each round, so no runner always follows the same one (caches, clocks).
        for r in runners[i % len(runners) :] + runners[: i % len(runners)]:
            start = time.perf_counter()
            r.step()
            out[r.name]["times"].append(time.perf_counter() - start)
    return out


def benchmark_config(name: str, config, args, log) -> dict:
    spec = model_spec(config.model, image_size=config.data.image_size)
    vocab = vocab_size(config, args.vocab)
    batch_size = int(config.data.batch_size)
    flops = train_flops(config)
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind, args.peak_tflops)
    log(describe(name, config, spec, vocab))
    log(
        f"  devices: {jax.device_count()} x {jax.default_backend()} (device kind: {device_kind}); "
        f"FLOPs/step (clipjax.flops): {flops:.4g}; "
        f"peak/device: {'n/a' if peak is None else f'{peak / 1e12:g} TFLOP/s'}; "
        f"log(batch) = {math.log(batch_size):.3f} (the loss of uninformative embeddings)"
    )
    batch = synthetic_batch(config, vocab, seed=int(config.seed))
    runners, skipped = build_runners(
        config, spec, vocab, batch, reference=not args.no_reference, openclip=not args.no_openclip, log=log
    )
    if runners and isinstance(runners[0], ClipjaxRunner):
        log(f"  clipjax mesh: {runners[0].mesh}")
    timed = time_runners(runners, steps=args.steps, warmup=args.warmup)
    results = {}
    for r in runners:
        t = timed[r.name]
        step_s = statistics.median(t["times"]) if t["times"] else float("nan")
        per_device = flops / step_s / r.devices
        results[r.name] = {
            "label": r.label,
            "params": r.params,
            "devices": r.devices,
            "loss_step0": t["loss_step0"],
            "first_step_s": t["first_step_s"],
            "step_ms": 1e3 * step_s,
            "step_ms_all": [1e3 * x for x in t["times"]],
            "samples_per_s": batch_size / step_s,
            "tflops_per_device": per_device / 1e12,
            "mfu": None if peak is None else per_device / peak,
        }
    base = results.get(ReferenceRunner.name)
    for res in results.values():
        res["vs_reference"] = None if base is None else res["step_ms"] / base["step_ms"] - 1
    overhead = results[ClipjaxRunner.name]["vs_reference"] if ClipjaxRunner.name in results else None
    log(table(results, peak, device_kind))
    if overhead is not None:
        verdict = "within" if overhead <= 0.05 else "above"
        log(f"  clipjax overhead vs plain JAX: {100 * overhead:+.1f}% ({verdict} the 5% target)")
    if OpenClipRunner.name in results and ClipjaxRunner.name in results:
        ratio = results[OpenClipRunner.name]["step_ms"] / results[ClipjaxRunner.name]["step_ms"]
        log(f"  clipjax vs open_clip: {ratio:.2f}x the samples/s")
    return {
        "name": name,
        "description": describe(name, config, spec, vocab),
        "batch": batch_size,
        "vocab": vocab,
        "device_count": jax.device_count(),
        "backend": jax.default_backend(),
        "device_kind": device_kind,
        "flops_per_step": flops,
        "peak_flops_per_device": peak,
        "log_batch": math.log(batch_size),
        "overhead_vs_reference": overhead,
        "results": results,
        "skipped": skipped,
    }


def table(results: dict, peak, device_kind: str) -> str:
    head = (
        f"  {'':<44} {'params':>10} {'loss@0':>8} {'first s':>8} {'step ms':>9} {'samples/s':>10} "
        f"{'TFLOP/s/dev':>11}  {'MFU':<24} {'vs plain JAX':>12}"
    )
    rows = [head]
    for res in results.values():
        mfu = f"n/a (no peak for {device_kind})"[:24] if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        vs = "" if res["vs_reference"] is None else f"{100 * res['vs_reference']:+.1f}%"
        vs = "(baseline)" if res["label"].startswith("plain JAX") else vs
        rows.append(
            f"  {res['label'][:44]:<44} {res['params']:>10,} {res['loss_step0']:>8.4f} "
            f"{res['first_step_s']:>8.1f} {res['step_ms']:>9.1f} {res['samples_per_s']:>10.1f} "
            f"{res['tflops_per_device']:>11.4f}  {mfu:<24} {vs:>12}"
        )
    return "\n".join(rows)


def train_flops(config) -> float:
    # Imported late: clipjax.flops is newer than this script's other imports.
    from clipjax.flops import train_flops_per_step

    return float(train_flops_per_step(config))


def peak_flops(device_kind: str, override_tflops: float) -> float | None:
    from clipjax.flops import peak_flops_per_device

    return peak_flops_per_device(device_kind, override_tflops or 0.0)


# ---------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/train_throughput.py",
        description=(
            "Samples/s, step time and MFU of clipjax's real train step, side by side with a plain-JAX "
            "reference of the same model (only for a ViT image tower + text Transformer, the softmax "
            "loss and AdamW; skipped with the reason otherwise) and open_clip on the identical "
            "architecture (when torch and open_clip import). Read the module docstring for the "
            "open_clip setup."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SETUP_HEADING + (__doc__ or "").split(SETUP_HEADING, 1)[-1],
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help=f"a configs/*.py file (optionally file.py:arg) or a preset ({', '.join(PRESETS)}); repeatable",
    )
    parser.add_argument("--configs", nargs="+", default=[], help="several configs (files or presets) at once")
    parser.add_argument("--preset", choices=tuple(PRESETS), help=f"a preset (default {DEFAULT_PRESET})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted config override, e.g. --set loss.impl=gather (also accepted: --config.KEY=VALUE)",
    )
    parser.add_argument("--batch", type=int, default=0, help="global batch size (overrides data.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per runner (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    parser.add_argument(
        "--vocab", type=int, default=0, help="text vocabulary (default: from the tokenizer config)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="peak TFLOP/s per device for MFU (default: the chip's)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-JAX reference")
    parser.add_argument("--no-openclip", action="store_true", help="skip open_clip")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--config.KEY=VALUE`, as clipjax.train takes overrides, becomes --set KEY=VALUE.
    dotted = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.set += [a[len("--config.") :] for a in dotted]
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = parse_value(value)
    args.overrides = overrides
    args.specs = args.config + args.configs + ([args.preset] if args.preset else [])
    if not args.specs:
        args.specs = [DEFAULT_PRESET]
    return args


def leave_gpu_memory_for_torch(args) -> None:
    """JAX takes 75% of a GPU's memory when its backend starts, which would leave open_clip (in
    this process, on the same GPU) too little; ask it for half instead. Must run before anything
    starts JAX's backends; an explicit XLA_PYTHON_CLIENT_MEM_FRACTION wins."""
    if args.no_openclip or "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
        return
    try:
        torch = import_open_clip()[0]
    except Skip:
        return
    if torch.cuda.is_available():
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.5"


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    args = parse_args(argv)
    leave_gpu_memory_for_torch(args)
    report = {
        "jax": jax.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "overrides": {k: repr(v) for k, v in args.overrides.items()},
        "configs": [],
    }
    for spec in args.specs:
        try:
            config, note = load_config(spec, copy.deepcopy(args.overrides), args.batch)
        except ConfigError as e:
            raise SystemExit(f"{spec}: {e}") from None
        if note:
            log(f"{spec}: {note}")
        report["configs"].append(benchmark_config(spec, config, args, log))
        log("")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
