"""The analytic FLOP count (clipjax.flops) against the programs the code traces and compiles,
the peak table, and tflops_per_device / mfu in the training logs.

Two independent references: the matmuls and convolutions of the traced program (a jaxpr walk
that knows a `scan` runs its body `length` times), which must equal the analytic count exactly;
and XLA's cost analysis, which counts a scanned layer stack once and adds elementwise ops, so it
is compared at depth 1 within a band of a few percent.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from clipjax import flops
from clipjax.losses import image_losses
from clipjax.config import apply_overrides
from clipjax.losses import contrastive_loss
from clipjax.models import IMAGE_TOWERS, model_factory, model_spec, resnet, text, vit
from clipjax.models.spec import naflex_seq_lens
from clipjax.parallel import make_mesh
from clipjax.trainer.hooks import LogHook
from clipjax.trainer.loop import StepInfo
from clipjax.trainer.step import make_grad_fn
from tests.helpers import load_config

# --------------------------------------------------------------- matmul FLOPs of a traced program


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def traced_matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and convolution a jaxpr runs, over all devices."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / out_features
        elif name == "while":
            raise AssertionError("a while loop has no static trip count")
        elif name == "cond":
            total += max(traced_matmul_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(traced_matmul_flops(j) for j in _sub_jaxprs(eqn.params))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":
                # The body sees one device's block; every device of the manual axes runs it.
                mesh = eqn.params["mesh"]
                inner *= math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
            total += inner
    return total


def _abstract(module):
    graphdef, state = nnx.split(nnx.eval_shape(module))
    return graphdef, state


def _forward(graphdef):
    return lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)


BATCH = 4


def _tower(kind, size, **spec):
    """(module factory, example input, analytic forward FLOPs per example)."""
    if kind == "text":
        s = text.TextSpec(**spec)
        make = lambda: text.TextTransformer(s, vocab_size=100, max_len=size, rngs=nnx.Rngs(0))
        x = jax.ShapeDtypeStruct((BATCH, size), jnp.int32)
    else:
        s = (vit.ViTSpec if kind == "vit" else resnet.ResNetSpec)(**spec)
        module = IMAGE_TOWERS[kind].Tower
        make = lambda: module(s, image_size=size, rngs=nnx.Rngs(0))
        x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    return make, x, flops.tower_forward_flops(kind, s, size)


VIT_TINY = dict(width=64, depth=1, heads=4, mlp_dim=256, patch_size=4)
TEXT_TINY = dict(width=64, depth=1, heads=4, mlp_dim=256)
RESNET_BLOCKS = dict(
    stem_width=16, widths=(32, 64), strides=(2, 2), blocks_per_stage=(1, 1), pool="attention", attn_heads=2
)
TOWERS = {
    "vit-cls-conv": ("vit", 32, VIT_TINY),
    "vit-map-dense": ("vit", 32, {**VIT_TINY, "pool": "map", "patch_embed": "dense"}),
    "vit-mean-depth3": ("vit", 32, {**VIT_TINY, "pool": "mean", "depth": 3}),
    "vit-B/16": ("vit", 224, {**vit.VARIANTS["B/16"], "pool": "cls"}),
    # NaFlex on square images: one grid, the position table resized to it all the same.
    "vit-naflex-map": ("vit", 32, {**VIT_TINY, "pool": "map", "naflex": True}),
    "vit-attentional-pooler": (
        "vit",
        32,
        {
            **VIT_TINY,
            "pool": "attentional_pooler",
            "pooler_queries": 5,
            "pooler_heads": 2,
            "pooler_width": 48,
        },
    ),
    "text": ("text", 16, TEXT_TINY),
    "text-causal-depth2": ("text", 64, {**TEXT_TINY, "depth": 2, "causal": True, "pool": "last"}),
    "text-B": ("text", 77, {**text.VARIANTS["B"], "causal": True, "pool": "last"}),
    "text-cls": ("text", 16, {**TEXT_TINY, "causal": True, "pool": "cls"}),
    "resnet-tiny": (
        "resnet",
        32,
        dict(stem_width=32, widths=(64, 128, 128), strides=(2, 2, 2), blocks_per_stage=(0, 0, 0)),
    ),
    "resnet-blocks-attention": ("resnet", 32, RESNET_BLOCKS),
    "resnet-mean-stride2": (
        "resnet",
        30,
        {**RESNET_BLOCKS, "pool": "mean", "stem_stride": 2, "blocks_per_stage": (2, 1)},
    ),
    "resnet-RN50": (
        "resnet",
        224,
        {**resnet.VARIANTS["RN50"], "blocks_per_stage": (3, 4, 6, 3), "attn_heads": 8},
    ),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_count_equals_the_traced_matmuls(name):
    kind, size, spec = TOWERS[name]
    make, x, analytic = _tower(kind, size, **spec)
    graphdef, state = _abstract(make)
    traced = traced_matmul_flops(jax.make_jaxpr(_forward(graphdef))(state, x).jaxpr) / BATCH
    assert traced == pytest.approx(analytic, rel=1e-9)


def test_every_image_tower_kind_has_a_count():
    assert set(flops.IMAGE_TOWER_FLOPS) == set(IMAGE_TOWERS)


# Depth 1: XLA counts a scanned stack's body once, so deeper stacks would be undercounted there.
# Elementwise ops (norms, GELU, softmax, residuals) put XLA a few percent above the matmuls; a
# formula without the attention scores (~14% of these towers) or with a multiply-add as one
# FLOP (50%) falls outside the band.
XLA_CASES = {
    "vit": ("vit", 32, VIT_TINY),
    "text-causal": ("text", 64, {**TEXT_TINY, "causal": True, "pool": "last"}),
    "resnet": ("resnet", 32, RESNET_BLOCKS),
}


@pytest.mark.parametrize("name", list(XLA_CASES))
def test_tower_count_agrees_with_xla_cost_analysis_at_depth_1(name):
    kind, size, spec = XLA_CASES[name]
    make, x, analytic = _tower(kind, size, **spec)
    graphdef, state = _abstract(make)
    compiled = jax.jit(_forward(graphdef)).lower(state, x).compile()
    xla = compiled.cost_analysis()["flops"] / BATCH
    assert 0.99 * analytic <= xla <= 1.10 * analytic, xla / analytic


# ------------------------------------------------------------------------- loss and train step


@pytest.mark.parametrize(
    "name,impl", [("softmax", "ring"), ("sigmoid", "ring"), ("softmax", "gather"), ("sigmoid", "gather")]
)
def test_loss_count_equals_the_traced_value_and_grad(name, impl):
    """On 4 devices, so the ring's laps and the gather's all-gathers are in the program."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(4, 1, 1), ("data", "fsdp", "model"))
    batch, dim = 64, 32
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    loss = lambda i, t, s, b: contrastive_loss(
        name, i, t, s, b, mesh=mesh, batch_axes=("data", "fsdp"), impl=impl
    )
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(emb, emb, scalar, scalar)
    assert traced_matmul_flops(jaxpr.jaxpr) == flops.loss_flops(name, impl, batch, dim)
    assert flops.loss_flops("alignment", impl, batch, dim) == 0


def _first_layer_flops(config, patches: int = 0) -> float:
    """Forward FLOPs per example of the layer that reads the images (and of a NaFlex ViT's
    position table resized by weights made from the grids): autodiff takes no gradient with
    respect to their input, while the 3x rule counts one. `patches`: a NaFlex batch's length."""
    spec = model_spec(config.model, image_size=config.data.image_size)
    size, image = config.data.image_size, spec.image
    if spec.image_kind == "vit":
        grid = (size // image.patch_size) ** 2
        patches = patches or grid
        resize = flops.dense_flops(patches, grid, image.width) if image.naflex else 0.0
        return flops.dense_flops(patches, image.patch_size**2 * 3, image.width) + resize
    return flops.conv_flops(-(-size // image.stem_stride), 3, 3, image.stem_width)


STEP_CASES = {
    "demo": ("demo.py", {}),
    "demo-gather-microbatches": ("demo.py", {"loss.impl": "gather", "microbatches": 2}),
    "vit-sigmoid-ring": ("siglip_vit_b16.py", {"model.remat": "none"}),
    "vit-softmax-microbatches": ("clip_vit_b16.py", {"model.remat": "none", "microbatches": 4}),
    # A captioning decoder continuing from the text tower, reading every image token.
    "coca": ("coca_demo.py", {}),
    "coca-microbatches": ("coca_demo.py", {"microbatches": 2}),
    # Its own tied embedding, reading an attentional pooler's queries.
    "decoder-embed-pooler-tied": (
        "coca_demo.py",
        {
            "model.decoder.input": "embed",
            "model.decoder.cross_attention": "pooler",
            "model.decoder.pooler_queries": 5,
            "model.decoder.tie_embedding": True,
        },
    ),
    # open_clip's CoCa layout: the image tower's attentional pooler feeds the decoder as it is.
    "decoder-open-clip-coca": (
        "coca_demo.py",
        {
            "model.image.kind": "vit",
            "model.image.patch_size": 8,
            "model.image.pool": "attentional_pooler",
            "model.image.pooler_queries": 5,
            "model.image.pooler_heads": 2,
            "model.text.pool": "cls",
            "model.decoder.input": "text_tower_raw",
            "model.decoder.cross_attention": "tokens_raw",
            "model.decoder.block": "mlp_per_attention",
            "model.decoder.output_bias": False,
        },
    ),
    # NaFlex patch sequences, at the shorter of the config's two lengths (its count's default is
    # the longest).
    "naflex": ("siglip2_naflex_vit_b16.py", {"model.remat": "none"}),
    # SigLIP 2's image-side losses (on from the first step): the teacher's forward pass, two
    # local views and the masked image through the student.
    "image-losses": (
        "demo.py",
        {
            "model.image.kind": "vit",
            "model.image.pool": "cls",
            "model.image.patch_size": 8,
            "model.image_heads.prototypes": 48,
            "image_losses.self_distillation": 1.0,
            "image_losses.masked_prediction": 1.0,
            "image_losses.start": 0.0,
        },
    ),
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_train_step_count_equals_the_traced_gradient(name):
    """The whole gradient of a step (towers forward and backward, loss) on one device.

    Remat is off: its recomputation is in the program but, by the MFU convention, not in the
    count."""
    file, overrides = STEP_CASES[name]
    config = apply_overrides(load_config(file), {"mesh.shape": (1, 1, 1), **overrides})
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    model = nnx.eval_shape(model_factory(config, vocab_size=300))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b, size = config.data.batch_size, config.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
        "text": jax.ShapeDtypeStruct((b, config.data.tokenizer.max_len), jnp.int32),
    }
    patches = min(naflex_seq_lens(config), default=0)
    if patches:
        p = config.model.image.patch_size or vit.VARIANTS[config.model.image.variant]["patch_size"]
        batch["image"] = jax.ShapeDtypeStruct((b, patches, p * p * 3), jnp.uint8)
        batch["image_grid"] = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    grad_fn = make_grad_fn(config, graphdef, mesh)
    if image_losses.active(config):  # the EMA teacher: the same shapes as the student's parts
        k = config.model.image_heads.prototypes
        centers = {
            "pooled": jax.ShapeDtypeStruct((k,), jnp.float32),
            "patch": jax.ShapeDtypeStruct((k,), jnp.float32),
        }
        teacher = {**{part: params[part] for part in image_losses.TEACHER_PARTS}, "centers": centers}
        jaxpr = jax.make_jaxpr(lambda p, b, t: grad_fn(p, b, None, 0, teacher=t))(params, batch, teacher)
    else:
        jaxpr = jax.make_jaxpr(grad_fn)(params, batch)
    # Each student pass of the image-side losses (local views, the masked image) reads images too.
    student_passes = 1 + (config.image_losses.local_views + 1 if image_losses.active(config) else 0)
    expected = flops.train_flops_per_step(
        config, vocab_size=300, image_seq_len=patches or None
    ) - b * student_passes * _first_layer_flops(config, patches)
    assert traced_matmul_flops(jaxpr.jaxpr) == pytest.approx(expected, rel=1e-9)


def test_microbatches_run_the_towers_forward_twice():
    config = load_config("demo.py")
    towers = flops.forward_flops_per_example(config) * config.data.batch_size
    loss = flops.loss_flops(
        config.loss.name, config.loss.impl, config.data.batch_size, config.model.embed_dim
    )
    assert flops.train_flops_per_step(config) == pytest.approx(3 * towers + loss)
    config.microbatches = 2
    assert flops.train_flops_per_step(config) == pytest.approx(4 * towers + loss)


def test_vit_b16_clip_matches_the_published_size():
    """ViT-B/16 at 224 px is 17.6 GMACs forward (timm, fvcore count multiply-adds): 35.1 GFLOPs."""
    config = load_config("clip_vit_b16.py", "")
    spec = model_spec(config.model, image_size=224)
    parts = flops.model_forward_flops(spec, image_size=224, text_len=77)
    assert parts["image"] / 2e9 == pytest.approx(17.56, abs=0.02)
    assert parts["text"] / 2e9 == pytest.approx(2.98, abs=0.02)


# ------------------------------------------------------------------------------------ peak table


@pytest.mark.parametrize(
    "kind,tflops",
    [
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5e", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("TPU v6e", 918),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
    ],
)
def test_peak_flops_by_device_kind(kind, tflops):
    assert flops.peak_flops_per_device(kind) == tflops * 1e12


@pytest.mark.parametrize(
    "kind", ["cpu", "TPU v4 lite", "TPU v3", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB"]
)
def test_unknown_devices_have_no_peak(kind):
    assert flops.peak_flops_per_device(kind) is None


def test_the_override_wins():
    assert flops.peak_flops_per_device("cpu", 1.5) == 1.5e12
    assert flops.peak_flops_per_device("TPU v4", 100.0) == 100e12
    assert flops.peak_flops_per_device("TPU v4", 0.0) == 275e12


# --------------------------------------------------------------------------------------- logging


class _Recorder:
    def __init__(self):
        self.records = []

    def write(self, step, scalars):
        self.records.append(dict(scalars))

    def update(self, *args):
        pass


class _NoDrops:
    drop_counts = {}


@pytest.mark.parametrize("peak", [None, 2e12])
def test_log_hook_writes_flops_and_mfu(peak, monkeypatch):
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr("clipjax.trainer.hooks.time.perf_counter", lambda: next(clock))
    writer = _Recorder()
    hook = LogHook(
        writer,
        writer,
        global_batch=8,
        data_iterator=_NoDrops(),
        start_step=0,
        flops_per_step=4e12,
        peak_flops=peak,
        num_devices=4,
    )
    hook(StepInfo(10, {}, {}, False, _host=({"loss": 1.0}, {})))
    record = writer.records[-1]
    assert record["samples_per_sec"] == pytest.approx(40.0)  # 10 steps of 8 in 2 s
    assert record["tflops_per_device"] == pytest.approx(5.0)  # 10 x 4 TFLOP / 2 s / 4 devices
    if peak is None:
        assert "mfu" not in record
    else:
        assert record["mfu"] == pytest.approx(2.5)


def test_training_logs_tflops_and_mfu(tiny_run):
    """The shared tiny run, trained with peak_tflops=1 (tests/conftest.py: TINY_RUN_EXTRAS)."""
    config = tiny_run.config()
    records = [json.loads(line) for line in open(tiny_run.workdir / "metrics.jsonl")]
    logged = [r for r in records if "tflops_per_device" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # every logged step
    for r in logged:
        assert r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
        # Both come from the same interval as samples/s.
        per_device = r["samples_per_sec"] / config.data.batch_size * flops.train_flops_per_step(config) / 8
        assert r["tflops_per_device"] == pytest.approx(per_device / 1e12, rel=1e-6)
