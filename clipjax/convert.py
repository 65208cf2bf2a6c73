"""Published CLIP / SigLIP checkpoints in, Hugging Face and open_clip checkpoints out.

    python -m clipjax.convert import --format open_clip --checkpoint ViT-B-32.pt \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --arch ViT-B-32-quickgelu --out runs/clip_b32
    python -m clipjax.convert import --format hf_clip --checkpoint clip-vit-base-patch16/ --out runs/hf_b16
    python -m clipjax.convert import --format hf_siglip --checkpoint siglip-base-patch16-224/ --out runs/siglip
    python -m clipjax.convert import --format hf_siglip --checkpoint siglip2-base-patch16-224/ --out runs/siglip2
    python -m clipjax.convert import --format hf_siglip2_naflex --checkpoint siglip2-base-patch16-naflex/ \\
        --out runs/siglip2_naflex
    python -m clipjax.convert export --format hf_clip --workdir runs/clip_b32 --out exported/
    python -m clipjax.convert export --to open_clip --workdir runs/clip_b32 --out exported_oc/

`import` writes a clipjax workdir (config.json, a step-0 Orbax checkpoint, the tokenizer in its
metadata) that `clipjax.load`, `python -m clipjax.evaluate` and `--config.init_from` read.
open_clip checkpoints are .pt/.bin (read with torch) or .safetensors (read without it); Hugging
Face folders hold config.json and model.safetensors (or pytorch_model.bin) and usually their
tokenizer (tokenizer.json, spiece.model, SigLIP 2's Gemma tokenizer.model), which is taken unless
--tokenizer names another.
`export` writes model.safetensors and config.json that transformers' CLIPModel / SiglipModel /
Siglip2Model load (NaFlex: and preprocessor_config.json), or (--format/--to open_clip)
open_clip_model.safetensors and open_clip_config.json that open_clip.create_model("local-dir:FOLDER")
loads. Mistakes are one line (exit status 2);
--verbose adds the traceback. docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import sys

from clipjax.cli import run_reporting_errors
from clipjax.pretrained.layouts import EXPORT_FILES, EXPORTERS, IMPORTERS

PROG = "clipjax.convert"


def _import(args) -> None:
    from clipjax.pretrained import workdir

    keys, params, vocab = workdir.read_source(
        args.format,
        args.checkpoint,
        activation=args.activation,
        head_width=args.head_width,
        arch=args.arch,
        log=lambda note: print(f"{PROG}: note: {note}", file=sys.stderr),
    )
    tokenizer_file = args.tokenizer or workdir.find_tokenizer(args.checkpoint)
    if not tokenizer_file:
        raise FileNotFoundError(
            "--tokenizer: name the model's tokenizer file (CLIP: bpe_simple_vocab_16e6.txt.gz; "
            "Hugging Face: tokenizer.json; SigLIP: spiece.model; SigLIP 2: tokenizer.json or tokenizer.model)"
        )
    keys.update(workdir.tokenizer_keys(tokenizer_file, args.format))
    config, _, params = workdir.assemble(keys, params, vocab)
    workdir.write_workdir(args.out, config, params, vocab_size=vocab)
    print(
        f"{PROG}: wrote {args.out} ({args.format} {args.checkpoint}); try: python -m clipjax.evaluate "
        f"--workdir {args.out} --config.evals.imagenet.enabled=True --config.evals.imagenet.data_dir=..."
    )


def _export(args) -> None:
    import jax

    from clipjax.api import load
    from clipjax.pretrained import workdir

    model = load(args.workdir, args.step, devices=jax.devices()[:1])
    workdir.export(args.format, model.config, model.params, model.tokenizer, args.out)
    files = ", ".join(EXPORT_FILES[args.format])
    print(f"{PROG}: wrote {args.out} ({files}) from {args.workdir} step {model.step}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print tracebacks with errors")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a published checkpoint -> a clipjax workdir")
    imp.add_argument("--format", required=True, choices=sorted(IMPORTERS))
    imp.add_argument(
        "--checkpoint",
        required=True,
        help="open_clip: a file, or a folder with open_clip_model.safetensors and open_clip_config.json; "
        "Hugging Face: the model folder",
    )
    imp.add_argument("--tokenizer", help="the tokenizer file (default: the one in the Hugging Face folder)")
    imp.add_argument(
        "--activation",
        choices=("quick_gelu", "gelu", "gelu_tanh"),
        help="the MLP non-linearity; open_clip files do not record it: OpenAI's models (open_clip's "
        "-quickgelu names) use quick_gelu, open_clip-trained ones gelu. Default: what the folder's "
        "open_clip_config.json says, else quick_gelu for a file recognised as OpenAI's (a TorchScript "
        "archive), else what --arch implies; with none of these, give --arch or --activation",
    )
    imp.add_argument(
        "--arch",
        default="",
        help="open_clip: the model name (ViT-B-32-quickgelu, ViT-H-14, ...), for what the file does not "
        "record: the activation and the image tower's channels per head",
    )
    imp.add_argument(
        "--head_width", type=int, default=None, help="open_clip: image channels per attention head"
    )
    imp.add_argument("--out", required=True, help="the new clipjax workdir")
    exp = commands.add_parser("export", help="a clipjax workdir -> a Hugging Face or open_clip model folder")
    exp.add_argument("--format", "--to", dest="format", required=True, choices=sorted(EXPORTERS))
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    exp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run_reporting_errors(PROG, lambda: (_import if args.command == "import" else _export)(args))


if __name__ == "__main__":
    main(sys.argv[1:])
