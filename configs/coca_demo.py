"""CoCa on the embedded `shapes` data: the demo's dual encoder plus a captioning decoder.

    python -m clipjax.train --config configs/coca_demo.py --workdir runs/coca_demo

The text tower becomes CoCa's unimodal decoder (causal attention; its last real token, the
end-of-text, gives the contrastive embedding), and two more blocks continue from its token
outputs with cross-attention to the image tower's 4 x 4 map (16 tokens) to predict each next
word (Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", 2022). The
loss is the demo's InfoNCE plus 2 x the captioning cross-entropy, as in the paper. Evaluation
adds the captioning evaluator: held-out perplexity, and the shape, colour, size and position
that the greedy captions of held-out images state (docs/captioning.md).

    model = clipjax.load("runs/coca_demo"); model.caption(images)   # one caption per image

`:contrastive` is the same model and steps without the decoder (the comparison in
docs/captioning.md); `:tiny` a few steps (the tests run every config).

Pod: v5e:2x2 (4 chips, the smallest slice; the demo itself runs on a CPU); checked by `python -m
clipjax.plan` (docs/scaling.md).
"""

import pathlib

from clipjax.cli import load_config_file


def _demo_config(arg: str):
    return load_config_file(f"{pathlib.Path(__file__).resolve().parent / 'demo.py'}:{arg}")


def get_config(arg: str = ""):
    if arg not in ("", "tiny", "contrastive"):
        raise ValueError(f"configs/coca_demo.py: unknown arg {arg!r} (expected '', 'tiny' or 'contrastive')")
    c = _demo_config("tiny" if arg == "tiny" else "")
    c.model.text.causal = True
    c.model.text.pool = "last"
    # The demo's 12 tokens cut 38% of the shapes captions short (their eos and often their
    # position words): a captioner must see whole captions to learn where they end.
    c.data.tokenizer.max_len = 16
    if arg == "contrastive":
        return c
    c.model.decoder.variant = "tiny"
    c.model.decoder.input = "text_tower"
    c.model.decoder.cross_attention = "tokens"
    c.loss.caption_weight = 2.0
    c.loss.contrastive_weight = 1.0
    c.evals.captioning.enabled = True
    c.evals.captioning.generate_examples = 64 if arg == "tiny" else 1000
    return c
