"""open_clip's CoCa (`open_clip.create_model('coca_ViT-B-32')`, `coca_ViT-L-14`) in and out.

Its state dict beside a CLIP's: the ViT (`visual.*`) ends in an attentional pooler
(`visual.attn_pool`: learned queries, `ln_q` on them, `ln_k` on the tokens, torch attention whose
keys and values read the ViT's width) and `ln_post`; query 0 is projected (`visual.proj`) to the
contrastive embedding, the others are what the multimodal decoder reads. The text tower
(`text.*`) appends a learned token (`cls_emb`, with a position of its own) whose final-normed
output is projected; its other outputs, before the final LayerNorm, go on into the decoder
(`text_decoder.*`): per layer a causal self-attention block with its MLP (`resblocks[i]`) and a
cross-attention block with its own LayerNorm on the image side and its MLP (`cross_attn[i]`),
then `ln_final` and `text_projection` [width, vocab] (no bias).

clipjax's matching options: model.image.pool='attentional_pooler', model.text.pool='cls',
model.decoder input='text_tower_raw', cross_attention='tokens_raw', block='mlp_per_attention',
output_bias=False. What the weights do not record (heads, activation) comes from the caller
(`clipjax.pretrained.workdir`: open_clip_config.json, --arch); open_clip's CoCa models use 64
channels per head in every tower and decoder, and 8 heads in the pooler.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clipjax.pretrained import layouts
from clipjax.pretrained.layouts import ConversionError, Tensors

WHAT = "open_clip CoCa checkpoint"
POOLER = "visual.attn_pool"


def is_coca(tensors: dict[str, Any]) -> bool:
    """Whether an open_clip state dict is a CoCa's (it has a multimodal decoder)."""
    return any(name.startswith("text_decoder.") for name in tensors)


def _pooler_attention(t: Tensors, heads: int) -> dict:
    """torch's MultiheadAttention keeps q/k/v apart when its keys read another width (kdim)."""
    prefix = f"{POOLER}.attn"
    if t.has(f"{prefix}.in_proj_weight"):
        return layouts._fused_attention(t, prefix, heads)
    bias = t.take(f"{prefix}.in_proj_bias")
    n = bias.shape[0] // 3
    return layouts._attention(
        t.take(f"{prefix}.q_proj_weight"), bias[:n], t.take(f"{prefix}.k_proj_weight"), bias[n : 2 * n],
        t.take(f"{prefix}.v_proj_weight"), bias[2 * n :], t.take(f"{prefix}.out_proj.weight"),
        t.take(f"{prefix}.out_proj.bias"), heads,
    )  # fmt: skip


def _decoder_layers(t: Tensors, heads: int) -> dict:
    depth = t.layers("text_decoder.resblocks.")
    if t.layers("text_decoder.cross_attn.") != depth:
        raise ConversionError(f"{WHAT}: text_decoder has unequal numbers of resblocks and cross_attn blocks")
    layers = []
    for i in range(depth):
        cross = f"text_decoder.cross_attn.{i}"
        block = layouts._open_clip_block(t, cross, heads)
        block["ln_kv"] = layouts._ln(t, f"{cross}.ln_1_kv")
        layers.append(
            {
                "self_block": layouts._open_clip_block(t, f"text_decoder.resblocks.{i}", heads),
                "cross_block": block,
            }
        )
    return {"blocks": layouts._stack(layers)}


def from_open_clip_coca(
    tensors: dict[str, Any],
    *,
    activation: str = "gelu",
    head_width: int = 64,
    text_head_width: int = 64,
    decoder_head_width: int = 64,
    pooler_heads: int = 8,
) -> tuple[dict, dict, int]:
    """open_clip CoCa state dict -> (config keys, params, vocab size). `activation` is every
    tower's (open_clip's one QuickGELU flag); the heads are `*_head_width` channels each, the
    pooler's `pooler_heads`."""
    t = Tensors(tensors, WHAT, ignored=lambda n: n.endswith("attn_mask"))
    if not t.has("visual.conv1.weight") or not t.has(f"{POOLER}.query"):
        raise ConversionError(f"{WHAT}: no ViT with an attentional pooler (visual.conv1, {POOLER})")
    image_tower, image_size = layouts.open_clip_vit(t, head_width)
    queries = t.take(f"{POOLER}.query")
    image_tower["pooler"] = {
        "queries": queries,
        "query_norm": layouts._ln(t, f"{POOLER}.ln_q"),
        "token_norm": layouts._ln(t, f"{POOLER}.ln_k"),
        "attn": _pooler_attention(t, pooler_heads),
    }
    image_tower["norm"] = layouts._ln(t, "visual.ln_post")
    tok, t_pos = t.take("text.token_embedding.weight"), t.take("text.positional_embedding")
    width = tok.shape[1]
    params = {
        "image_tower": image_tower,
        "image_proj": {"kernel": t.take("visual.proj")},
        "text_tower": {
            "embed": tok,
            "pos": t_pos,
            "cls": t.take("text.cls_emb"),
            "encoder": layouts._open_clip_blocks(t, "text.transformer.resblocks.", width // text_head_width),
            "norm": layouts._ln(t, "text.ln_final"),
        },
        "text_proj": {"kernel": t.take("text.text_projection")},
        "decoder": {
            "layers": _decoder_layers(t, width // decoder_head_width),
            "norm": layouts._ln(t, "text_decoder.ln_final"),
            "head": {"kernel": t.take("text_decoder.text_projection")},
        },
        "logit_scale": t.take("logit_scale").reshape(()),
    }
    if t.has("logit_bias"):
        params["logit_bias"] = t.take("logit_bias").reshape(())
    t.check_all_used()
    v_blocks = image_tower["encoder"]["blocks"]
    t_blocks = params["text_tower"]["encoder"]["blocks"]
    d_blocks = params["decoder"]["layers"]["blocks"]["self_block"]
    v_width = v_blocks["ln1"]["scale"].shape[-1]
    keys = layouts._clip_architecture(
        embed=params["image_proj"]["kernel"].shape[1],
        v_width=v_width,
        v_depth=v_blocks["ln1"]["scale"].shape[0],
        v_heads=v_width // head_width,
        v_mlp=v_blocks["mlp"]["fc1"]["kernel"].shape[-1],
        patch=image_tower["patch"]["kernel"].shape[0],
        image_size=image_size,
        t_width=width,
        t_depth=t_blocks["ln1"]["scale"].shape[0],
        t_heads=width // text_head_width,
        t_mlp=t_blocks["mlp"]["fc1"]["kernel"].shape[-1],
        ctx=t_pos.shape[0] - 1,  # the appended token has the last position
        activation=activation,
        norm_eps=1e-5,
    )
    keys.update(
        {
            "model.image.pool": "attentional_pooler",
            "model.image.pooler_queries": queries.shape[0],
            "model.image.pooler_heads": pooler_heads,
            "model.image.pooler_width": queries.shape[1],
            "model.text.pool": "cls",
            "model.text.pad_mask": True,
            "model.decoder.variant": "tiny",  # every size below is set
            "model.decoder.width": width,
            "model.decoder.depth": d_blocks["ln1"]["scale"].shape[0],
            "model.decoder.heads": width // decoder_head_width,
            "model.decoder.mlp_dim": d_blocks["mlp"]["fc1"]["kernel"].shape[-1],
            "model.decoder.input": "text_tower_raw",
            "model.decoder.cross_attention": "tokens_raw",
            "model.decoder.block": "mlp_per_attention",
            "model.decoder.output_bias": False,
            "model.decoder.tie_embedding": False,
            "model.decoder.activation": activation,
            "model.decoder.norm_eps": 1e-5,
        }
    )
    if "logit_bias" in params:
        keys["model.logit_bias_init"] = layouts._number(params["logit_bias"])
    return keys, params, tok.shape[0]


def _checks(spec) -> list[tuple[str, Any, Any]]:
    """What open_clip's CoCa fixes (open_clip builds its pooler's and decoder's LayerNorms with
    the default epsilon, its decoder's MLP 4 wide and its activation without the towers' options)."""
    v, t, d = spec.image, spec.text, spec.decoder
    return [
        ("model.image.pool", getattr(v, "pool", None), "attentional_pooler"),
        (
            "model.image.pooler_width",
            getattr(v, "pooler_width", None) or getattr(v, "width", None),
            spec.embed_dim,
        ),
        ("model.image.norm_eps", getattr(v, "norm_eps", None), 1e-5),
        ("model.image.patch_embed", getattr(v, "patch_embed", None), "conv"),
        ("model.image.patch_bias", getattr(v, "patch_bias", None), False),
        ("model.image.ln_pre", getattr(v, "ln_pre", None), True),
        ("model.text.pool", t.pool, "cls"),
        ("model.text.causal", t.causal, True),
        ("model.text.pad_mask", t.pad_mask, True),
        ("model.image_projection", spec.image_projection, "linear"),
        ("model.text_projection_bias", spec.text_projection_bias, False),
        ("model.decoder.input", d.input, "text_tower_raw"),
        ("model.decoder.cross_attention", d.cross_attention, "tokens_raw"),
        ("model.decoder.block", d.block, "mlp_per_attention"),
        ("model.decoder.output_bias", d.output_bias, False),
        ("model.decoder.tie_embedding", d.tie_embedding, False),
        ("model.decoder.mlp_dim", d.mlp_dim, 4 * d.width),
        ("model.decoder.norm_eps", d.norm_eps, 1e-5),
        ("model.decoder.activation", d.activation, "quick_gelu" if t.activation == "quick_gelu" else "gelu"),
    ]


def to_open_clip_coca(
    params: dict, spec, *, image_size: int, max_len: int, vocab_size: int, image_resize: str = "crop"
) -> tuple[dict, dict]:
    """clipjax params of a CoCa-layout model -> (open_clip `CoCa` state dict, open_clip_config.json
    whose `model_cfg` makes `open_clip.create_model('local-dir:...')` build a CoCa)."""
    v, d = spec.image, spec.decoder
    model_cfg = layouts.open_clip_towers_config(
        spec, _checks(spec), image_size=image_size, max_len=max_len, vocab_size=vocab_size
    )
    model_cfg["vision_cfg"].update(
        attentional_pool=True, attn_pooler_queries=v.pooler_queries, attn_pooler_heads=v.pooler_heads,
        output_tokens=True,
    )  # fmt: skip
    model_cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
    model_cfg["multimodal_cfg"] = {
        "width": d.width, "layers": d.depth, "heads": d.heads, "context_length": max_len, "vocab_size": vocab_size,
    }  # fmt: skip
    model_cfg["custom_text"] = True
    img, txt, dec = params["image_tower"], params["text_tower"], params["decoder"]
    out: dict[str, np.ndarray] = {
        "visual.proj": params["image_proj"]["kernel"],
        f"{POOLER}.query": img["pooler"]["queries"],
        "text.token_embedding.weight": txt["embed"],
        "text.positional_embedding": txt["pos"],
        "text.cls_emb": txt["cls"],
        "text.text_projection": params["text_proj"]["kernel"],
        "text_decoder.text_projection": dec["head"]["kernel"],
    }
    layouts.open_clip_visual(img, out)
    layouts._inv_ln(img["pooler"]["query_norm"], f"{POOLER}.ln_q", out)
    layouts._inv_ln(img["pooler"]["token_norm"], f"{POOLER}.ln_k", out)
    _inv_pooler_attention(img["pooler"]["attn"], out)
    blocks = layouts._OPEN_CLIP_BLOCK
    layouts._inv_blocks(txt["encoder"]["blocks"], "text.transformer.resblocks.", out, blocks)
    layouts._inv_ln(txt["norm"], "text.ln_final", out)
    stacked = dec["layers"]["blocks"]
    layouts._inv_blocks(stacked["self_block"], "text_decoder.resblocks.", out, blocks)
    layouts._inv_blocks(stacked["cross_block"], "text_decoder.cross_attn.", out, blocks)
    for i in range(d.depth):
        ln_kv = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked["cross_block"]["ln_kv"])
        layouts._inv_ln(ln_kv, f"text_decoder.cross_attn.{i}.ln_1_kv", out)
    layouts._inv_ln(dec["norm"], "text_decoder.ln_final", out)
    return layouts.open_clip_export(params, spec, out, model_cfg, image_resize)


def _inv_pooler_attention(attn: dict, out: dict) -> None:
    """The pooler's attention in torch's layout: fused where keys and values read the queries'
    width, else q/k/v apart (its kdim) with one in_proj_bias."""
    prefix = f"{POOLER}.attn"
    fused = attn["query"].shape[0] == attn["key"].shape[0]
    layouts._inv_attention(attn, prefix, out, fused=fused)
    if not fused:
        biases = [out.pop(f"{prefix}.{n}_proj.bias") for n in ("q", "k", "v")]
        for n in ("q", "k", "v"):
            out[f"{prefix}.{n}_proj_weight"] = out.pop(f"{prefix}.{n}_proj.weight")
        out[f"{prefix}.in_proj_bias"] = np.concatenate(biases)
