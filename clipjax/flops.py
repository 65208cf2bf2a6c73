"""Model FLOPs of a train step, counted from the config, and the chips' peak FLOP/s, for MFU.

Why analytic: XLA's `compiled.cost_analysis()` counts the body of a loop once, and every layer
stack here runs under `nnx.scan` (a loop), so on a 12-layer tower it reports about one layer's
worth. The count below is what the code computes, layer by layer.

The convention is that of MFU in PaLM (Chowdhery et al. 2022) and Megatron-LM:

  * a multiply-add is 2 FLOPs; an [m, k] x [k, n] matmul is 2mkn;
  * counted: the matmuls and convolutions (patch embedding, attention Q/K/V and output
    projections, the attention scores QK^T and the weighted sum AV, MLPs, convs, the
    projections to the shared space, the logits of the loss). Elementwise ops, norms, softmax,
    GELU, poolings and the optimizer update are left out: they are a few percent of the total
    at any useful size, and they run on the vector units, not at the matmul peak MFU is quoted
    against;
  * the text tower's token embedding is a table lookup: 0 FLOPs;
  * attention is counted at the full L x L the code computes, also where a causal or padding
    mask discards part of it;
  * training = forward + backward, the backward twice the forward (one product for the
    gradient of the inputs, one for the weights): 3x the forward for the towers. The first
    layer's input gradient, which autodiff skips, is counted anyway, as in the 6N rule;
  * with `config.microbatches > 1` (GradCache) the towers run forward twice, once without
    gradients to embed the batch and once under the VJP: 4x the forward;
  * `config.model.remat` recomputes activations in the backward pass, but those are not
    counted: this is MFU (model FLOPs utilisation), not HFU (hardware FLOPs);
  * the contrastive loss is counted as its implementation computes it (the ring recomputes its
    logits in the backward pass; see `loss_flops`); next to the towers it is small;
  * the embedding metrics of `metrics.every` steps are measurement, not training: not counted;
  * a NaFlex ViT counts its batch's sequence length, padding included (as attention is counted
    at full length), and the product that resizes its position table to each image's grid.

MFU is quoted against the dense bf16 peak of the chip (`PEAK_FLOPS`), whatever
`config.model.dtype` is: a float32 run simply has a low MFU.
"""

from __future__ import annotations

import re
from typing import Any

from clipjax.models.resnet import ResNetSpec
from clipjax.models.spec import DualEncoderSpec, config_model_spec, naflex_seq_lens
from clipjax.models.text import TextSpec
from clipjax.models.vit import ViTSpec

# Dense (not 2:4 sparse) bf16 peak FLOP/s per chip, from the vendors' datasheets.
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5e": 197e12,  # device_kind "TPU v5 lite"
    "TPU v5p": 459e12,  # device_kind "TPU v5"
    "TPU v6e": 918e12,  # device_kind "TPU v6 lite"
    "NVIDIA A100": 312e12,  # every A100 form factor
    "NVIDIA H100 SXM": 989e12,  # device_kind "NVIDIA H100 80GB HBM3"
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # and GH200, whose GPU is of the same class
    "NVIDIA H200 NVL": 835e12,
}

# TPU device kinds read "TPU v<generation>[<letter>][ lite]": v5e and v6e report themselves as
# "lite", v5p as plain "TPU v5". The letter, where present, settles which.
_TPU_KIND = re.compile(r"tpu v(\d+)([a-z]?)( lite)?\b")
_TPU_TABLE = {("4", False): "TPU v4", ("5", True): "TPU v5e", ("5", False): "TPU v5p", ("6", True): "TPU v6e"}


def chip_name(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` key of a `jax.Device.device_kind`, or None for chips not in the table.

    Rules, on the lower-cased kind: a TPU by generation and "lite"/letter (a "v4 lite" is not a
    v4); a GPU by model number ("a100", "h100", "h200"), where "pcie" or "nvl" picks the lower
    clocked, lower power part of the H100 and H200 ("gh200" counts as an H200). Anything else
    (CPUs, other GPUs) is unknown.
    """
    kind = device_kind.lower()
    tpu = _TPU_KIND.search(kind)
    if tpu:
        generation, letter, lite = tpu.groups()
        return _TPU_TABLE.get((generation, bool(lite) or letter == "e"))
    if "a100" in kind:
        return "NVIDIA A100"
    for model in ("h100", "h200"):
        if model in kind:
            if "nvl" in kind:
                return f"NVIDIA {model.upper()} NVL"
            if model == "h100":
                return "NVIDIA H100 PCIe" if "pcie" in kind else "NVIDIA H100 SXM"
            return "NVIDIA H200"
    return None


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` x 1e12 when positive (`config.peak_tflops`),
    else the dense bf16 peak of the chip; None where the chip is unknown (CPU)."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    name = chip_name(device_kind)
    return None if name is None else PEAK_FLOPS[name]


# ------------------------------------------------------------------ forward FLOPs per example


def dense_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_flops(q_len: int, kv_len: int, width: int, kv_width: int | None = None) -> float:
    """`layers.Attention`: Q from q_len tokens, K and V from kv_len (`kv_width` wide, default
    `width`), scores and weighted sum over all q_len x kv_len pairs (heads x head_dim = width),
    then the output projection."""
    projections = dense_flops(q_len, width, width) * 2 + dense_flops(kv_len, kv_width or width, width) * 2
    return projections + 2 * (2.0 * q_len * kv_len * width)


def mlp_flops(tokens: int, width: int, mlp_dim: int) -> float:
    return dense_flops(tokens, width, mlp_dim) + dense_flops(tokens, mlp_dim, width)


def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """`layers.TransformerBlock` (self-attention + MLP) over `tokens` tokens."""
    return attention_flops(tokens, tokens, width) + mlp_flops(tokens, width, mlp_dim)


def conv_flops(out_size: int, kernel: int, c_in: int, c_out: int) -> float:
    """A kernel x kernel conv with a square out_size x out_size output (padding included)."""
    return 2.0 * out_size * out_size * kernel * kernel * c_in * c_out


def vit_forward_flops(spec: ViTSpec, image_size: int, patches: int | None = None) -> float:
    """`patches`: a NaFlex batch's sequence length (default: the image_size grid's patches)."""
    p, w = spec.patch_size, spec.width
    grid = (image_size // p) ** 2
    patches = grid if patches is None else int(patches)
    tokens = patches + (1 if spec.pool in ("cls", "attentional_pooler") else 0)
    # The conv and dense patch embeddings are the same [patches, p*p*3] x [p*p*3, width] product.
    flops = dense_flops(patches, p * p * 3, w)
    if spec.naflex:  # the position table resized to each patch's place: [patches, grid] x [grid, width]
        flops += dense_flops(patches, grid, w)
    flops += spec.depth * block_flops(tokens, w, spec.mlp_dim)
    if spec.pool == "map":
        flops += attention_flops(1, tokens, w) + mlp_flops(1, w, spec.mlp_dim)
    if spec.pool == "attentional_pooler":
        flops += attention_flops(spec.pooler_queries, tokens, vit_out_dim(spec), kv_width=w)
    return flops


def vit_out_dim(spec: ViTSpec) -> int:
    """The width of the ViT's pooled output and of the tokens a decoder reads."""
    return (spec.pooler_width or spec.width) if spec.pool == "attentional_pooler" else spec.width


def _ceil_div(size: int, stride: int) -> int:
    return -(-size // stride)


def resnet_forward_flops(spec: ResNetSpec, image_size: int) -> float:
    size = _ceil_div(image_size, spec.stem_stride)
    flops = conv_flops(size, 3, 3, spec.stem_width)
    c_in = spec.stem_width
    for c_out, stride, blocks in zip(spec.widths, spec.strides, spec.blocks_per_stage):
        size = _ceil_div(size, stride)
        flops += conv_flops(size, 3, c_in, c_out) + blocks * 2 * conv_flops(size, 3, c_out, c_out)
        c_in = c_out
    if spec.pool == "attention":
        # The mean token queries the mean token and every position.
        flops += attention_flops(1, size * size + 1, c_in)
    return flops


def resnet_map_size(spec: ResNetSpec, image_size: int) -> int:
    """The side of the last stage's map."""
    size = _ceil_div(image_size, spec.stem_stride)
    for stride in spec.strides:
        size = _ceil_div(size, stride)
    return size


def resnet_out_dim(spec: ResNetSpec, image_size: int) -> int:
    size = resnet_map_size(spec, image_size)
    return size * size * spec.widths[-1] if spec.pool == "flatten" else spec.widths[-1]


def text_forward_flops(spec: TextSpec, length: int) -> float:
    # pool=cls: the appended token is one more position.
    return spec.depth * block_flops(length + (spec.pool == "cls"), spec.width, spec.mlp_dim)


# Per image tower kind (`clipjax.models.spec.IMAGE_TOWERS`): (forward FLOPs, output width), each
# a function of (spec, image_size). A new tower kind needs its entry here.
IMAGE_TOWER_FLOPS = {
    "vit": (vit_forward_flops, lambda spec, image_size: vit_out_dim(spec)),
    "resnet": (resnet_forward_flops, resnet_out_dim),
}


# Per image tower kind: (the number of tokens a decoder's cross-attention reads, their width),
# each a function of (spec, image_size). Only towers a decoder reads need an entry.
IMAGE_TOWER_TOKENS = {
    "vit": lambda spec, image_size: (
        spec.pooler_queries - 1
        if spec.pool == "attentional_pooler"
        else (image_size // spec.patch_size) ** 2 + (spec.pool == "cls"),
        vit_out_dim(spec),
    ),
    "resnet": lambda spec, image_size: (resnet_map_size(spec, image_size) ** 2, spec.widths[-1]),
}


def decoder_forward_flops(spec: DualEncoderSpec, *, image_size: int, text_len: int, vocab_size: int) -> float:
    """`models.decoder.CaptionDecoder` on one example: the image tokens brought to its width (and
    pooled), then per block causal self-attention over the text_len - 1 teacher-forced positions,
    cross-attention to the image and the MLP (block=mlp_per_attention: an MLP after each
    attention), and the next-token logits over the vocabulary."""
    d, positions = spec.decoder, text_len - 1
    tokens, token_dim = IMAGE_TOWER_TOKENS[spec.image_kind](spec.image, image_size)
    w = d.width
    flops = 0.0 if d.cross_attention == "tokens_raw" else dense_flops(tokens, token_dim, w)
    memory = tokens
    if d.cross_attention == "pooler":
        flops += attention_flops(d.pooler_queries, tokens, w)
        memory = d.pooler_queries
    if d.input == "text_tower":
        flops += dense_flops(positions, spec.text.width, w)
    mlps = 2 if d.block == "mlp_per_attention" else 1
    flops += d.depth * (
        attention_flops(positions, positions, w)
        + attention_flops(positions, memory, w)
        + mlps * mlp_flops(positions, w, d.mlp_dim)
    )
    return flops + dense_flops(positions, w, vocab_size)


def _image_tower(kind: str):
    if kind not in IMAGE_TOWER_FLOPS:
        raise ValueError(
            f"no FLOP count for the image tower {kind!r}: add it to clipjax.flops.IMAGE_TOWER_FLOPS"
        )
    return IMAGE_TOWER_FLOPS[kind]


def tower_forward_flops(kind: str, spec: Any, size: int, patches: int | None = None) -> float:
    """Forward FLOPs of one example through a tower, before the projection to the shared space.

    `kind` is an image tower kind with `size` the image side in pixels (a NaFlex ViT's patch
    sequences: `patches` long), or "text" with `size` the number of tokens the tower sees (the
    tokenizer's max_len: every text is padded to it).
    """
    if kind == "text":
        return text_forward_flops(spec, size)
    if patches is not None:
        return vit_forward_flops(spec, size, patches)
    return _image_tower(kind)[0](spec, size)


def model_forward_flops(
    spec: DualEncoderSpec,
    *,
    image_size: int,
    text_len: int,
    vocab_size: int | None = None,
    image_seq_len: int | None = None,
) -> dict[str, float]:
    """Forward FLOPs per example of each part of the dual encoder, and their `total`; with a
    captioning decoder also `decoder`, whose logits need the `vocab_size`. `image_seq_len`: a
    NaFlex model's patch sequences, that long."""
    image_out = _image_tower(spec.image_kind)[1](spec.image, image_size)
    if spec.task == "image_image":
        # Two views of each example through the tower and the projector; no text.
        hidden = spec.projector_hidden or image_out
        widths = [image_out] + [hidden] * (spec.projector_layers - 1) + [spec.embed_dim]
        parts = {
            "image": 2 * tower_forward_flops(spec.image_kind, spec.image, image_size),
            "text": 0.0,
            "projections": 2 * sum(dense_flops(1, a, b) for a, b in zip(widths[:-1], widths[1:])),
        }
        parts["total"] = sum(parts.values())
        return parts
    parts = {
        "image": tower_forward_flops(spec.image_kind, spec.image, image_size, image_seq_len),
        "text": tower_forward_flops("text", spec.text, text_len),
        "projections": (
            dense_flops(1, image_out, spec.embed_dim) if spec.image_projection == "linear" else 0.0
        )
        + dense_flops(1, spec.text.width, spec.embed_dim),
    }
    if spec.decoder is not None:
        if vocab_size is None:
            raise ValueError("the FLOPs of a captioning decoder need the vocab_size (its logits)")
        parts["decoder"] = decoder_forward_flops(
            spec, image_size=image_size, text_len=text_len, vocab_size=vocab_size
        )
    parts["total"] = sum(parts.values())
    return parts


def loss_flops(name: str, impl: str, batch: int, dim: int) -> float:
    """FLOPs of the contrastive loss's value and gradient over a global batch of [batch, dim]
    embeddings: a number of B x B x d logit products, as each implementation computes them.

      ring (softmax or sigmoid): 1 forward; 4 backward (one lap for the image gradient, one
        for the text gradient, each recomputing the logits before its gradient product): 5.
      gather softmax: 2 forward (image->text and text->image rows, each b x B per device);
        2 gradient products for each in the backward: 6.
      gather sigmoid: 1 forward, 2 backward: 3.
      alignment: no B x B product: 0.
    """
    if name == "alignment":
        return 0.0
    if impl == "ring":
        products = 5
    elif name not in ("sigmoid", "multi_positive_sigmoid"):  # the softmax family: both directions
        products = 6
    else:
        products = 3
    return products * 2.0 * batch * batch * dim


def _seq_len(config, image_seq_len: int | None) -> int | None:
    """The patch sequences counted: `image_seq_len`, else a NaFlex model's longest."""
    return image_seq_len or max(naflex_seq_lens(config), default=None)


def forward_flops_per_example(
    config, vocab_size: int | None = None, image_seq_len: int | None = None
) -> float:
    """Forward FLOPs of one example through the model of `config` (towers, projections and a
    captioning decoder, which needs the `vocab_size`); a NaFlex model's at `image_seq_len`
    patches (default: its longest training sequence)."""
    spec = config_model_spec(config)
    return model_forward_flops(
        spec,
        image_size=int(config.data.image_size),
        text_len=int(config.data.tokenizer.max_len),
        vocab_size=vocab_size,
        image_seq_len=_seq_len(config, image_seq_len),
    )["total"]


def prototype_head_flops(tokens: int, width: int, heads) -> float:
    """`models.image_heads.PrototypeHead` over `tokens` features of `width`."""
    return (
        dense_flops(tokens, width, heads.hidden)
        + dense_flops(tokens, heads.hidden, heads.bottleneck)
        + dense_flops(tokens, heads.bottleneck, heads.prototypes)
    )


def image_losses_flops_per_example(config) -> float:
    """SigLIP 2's image-side losses on one example once they are on (`image_losses`): the EMA
    teacher's forward pass of the image and both heads, and the student's forward and backward
    (3x) of each local view with the pooled head (self-distillation) and of the masked image
    with the patch head (masked prediction)."""
    from clipjax.losses import image_losses

    if not image_losses.active(config):
        return 0.0
    c, spec = config.image_losses, config_model_spec(config)
    size = int(config.data.image_size)
    tower = tower_forward_flops(spec.image_kind, spec.image, size)
    width, patches = vit_out_dim(spec.image), (size // spec.image.patch_size) ** 2
    pooled_head = prototype_head_flops(1, width, spec.image_heads)
    patch_head = prototype_head_flops(patches, width, spec.image_heads)
    flops = tower + pooled_head + patch_head
    if c.self_distillation:
        flops += 3 * int(c.local_views) * (tower + pooled_head)
    if c.masked_prediction:
        flops += 3 * (tower + patch_head)
    return flops


def train_flops_per_step(
    config, vocab_size: int | None = None, image_losses_on: bool = True, image_seq_len: int | None = None
) -> float:
    """Model FLOPs of one train step of `config` at its global batch (`config.data.batch_size`):
    both towers and their projections forward and backward (4x the forward with micro-batches,
    3x without), plus the loss (`loss_flops`). A tower frozen whole (`optim.frozen`, LiT) has
    no backward pass: its forward counts once (twice with micro-batches, which run it again in
    each micro-batch's gradient pass). A captioning decoder runs forward and backward once
    either way (the micro-batches' first pass embeds without it): 3x its forward. SigLIP 2's
    image-side losses add `image_losses_flops_per_example` (`image_losses_on`: the steps from
    their start on). A NaFlex model's batches have `image_seq_len` patches (default: its longest
    training sequence), padding included."""
    from clipjax.optim import matches

    batch = int(config.data.batch_size)
    micro = int(config.microbatches) > 1
    passes = 4 if micro else 3
    spec = config_model_spec(config)
    parts = model_forward_flops(
        spec,
        image_size=int(config.data.image_size),
        text_len=int(config.data.tokenizer.max_len),
        vocab_size=vocab_size,
        image_seq_len=_seq_len(config, image_seq_len),
    )
    frozen = tuple(config.optim.get("frozen", ()) or ())
    towers = 0.0
    for part, tower in (("image", "image_tower"), ("text", "text_tower")):
        whole = any(matches(p, tower) for p in frozen)
        towers += (2 if micro else 1) * parts[part] if whole else passes * parts[part]
    if "decoder" in parts:
        towers += (1 if any(matches(p, "decoder") for p in frozen) else 3) * parts["decoder"]
    towers = (towers + passes * parts["projections"]) * batch
    # Image-image: the 2B views are compared among themselves, (2B)^2 pairs.
    views = 2 * batch if spec.task == "image_image" else batch
    total = towers + loss_flops(config.loss.name, config.loss.impl, views, int(config.model.embed_dim))
    if image_losses_on:
        total += batch * image_losses_flops_per_example(config)
    return total
