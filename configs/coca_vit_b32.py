"""CoCa ViT-B/32: configs/clip_vit_b32.py's towers (the causal text tower is CoCa's unimodal
decoder) plus a 12-block multimodal decoder reading 256 attentional-pooler queries over the
image tokens, trained on webdataset shards with 1 x InfoNCE + 2 x captioning (Yu et al., 2022;
open_clip's `coca_ViT-B-32` has these sizes).

    python -m clipjax.train --config configs/coca_vit_b32.py --workdir gs://BUCKET/coca_b32 \
        --config.data.shards='gs://BUCKET/laion/{00000..41407}.tar' \
        --config.data.tokenizer.vocab_file=gs://BUCKET/bpe_simple_vocab_16e6.txt.gz
    launch/tpu_pod.sh --config configs/coca_vit_b32.py --workdir gs://BUCKET/coca_b32 ...

The rest (batch 32k, bf16, remat, optimizer) follows configs/clip_vit_b32.py. `:tiny` runs a
few steps on CPU with the same layout at a tiny size (docs/captioning.md).

Pod: v5p:4x4x4 (64 chips; Cloud TPU accelerator type v5p-128), 512 examples per chip, like
CLIP B/32; checked by `python -m clipjax.plan` (docs/scaling.md).
"""

import pathlib

from clipjax.cli import load_config_file


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/coca_vit_b32.py: unknown arg {arg!r} (expected '' or 'tiny')")
    c = load_config_file(f"{pathlib.Path(__file__).resolve().parent / 'clip_vit_b32.py'}:{arg}")
    d = c.model.decoder
    d.variant = "tiny" if arg == "tiny" else "B"
    d.input = "text_tower"
    d.cross_attention = "pooler"
    d.pooler_queries = 8 if arg == "tiny" else 256
    d.norm_eps = 1e-5
    c.loss.contrastive_weight = 1.0
    c.loss.caption_weight = 2.0
    # CLIP's 49,408 words x 76 positions are 15 MB of logits an example: an eighth at a time.
    c.loss.caption_vocab_chunk = 0 if arg == "tiny" else 6176
    c.evals.captioning.enabled = True
    return c
