"""Smoke test of benchmarks/train_throughput.py at a tiny size: it runs, reports and agrees on the
model; nothing here judges speed (CPU timings on a shared machine mean nothing)."""

import json
import math

import pytest

from tests.helpers import ROOT, load_benchmark

TINY = [
    "--set",
    "model.image.width=32",
    "--set",
    "model.image.depth=1",
    "--set",
    "model.image.heads=2",
    "--set",
    "model.image.mlp_dim=64",
    "--set",
    "model.text.width=32",
    "--set",
    "model.text.depth=1",
    "--set",
    "model.text.heads=2",
    "--set",
    "model.text.mlp_dim=64",
    "--config.model.embed_dim=16",  # the clipjax.train spelling of an override
    "--set",
    "data.image_size=16",
    "--set",
    "data.tokenizer.max_len=8",
    "--vocab",
    "64",
    "--batch",
    "16",
]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_throughput")


def test_tiny_preset_runs_and_reports(bench, tmp_path):
    out = tmp_path / "figures.json"
    lines = []
    # Temperature 1: logits are cosines in [-1, 1], so the first loss is log(batch) give or take
    # their spread, whatever the random initialisation.
    argv = [*TINY, "--set", "model.logit_scale_init=0.0", "--steps", "1", "--warmup", "0", "--no-openclip"]
    report = bench.main([*argv, "--json", str(out)], log=lines.append)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (entry,) = report["configs"]
    assert entry["name"] == "openclip_compare" and entry["batch"] == 16
    assert entry["flops_per_step"] > 0
    clipjax, reference = entry["results"]["clipjax"], entry["results"]["plain JAX"]
    # The same architecture, parameter for parameter.
    assert clipjax["params"] == reference["params"]
    for res in (clipjax, reference):
        assert res["step_ms"] > 0 and res["samples_per_s"] > 0
        assert res["mfu"] is None  # no CPU peak without --peak-tflops
        assert abs(res["loss_step0"] - math.log(16)) < 0.5
    assert entry["overhead_vs_reference"] == pytest.approx(clipjax["step_ms"] / reference["step_ms"] - 1)
    assert entry["skipped"] == {"open_clip": "--no-openclip"}
    assert any("open_clip: skipped: --no-openclip" in line for line in lines)
    assert any("overhead vs plain JAX" in line for line in lines)


def test_reference_says_why_it_skips_other_towers(bench):
    config, _ = bench.load_config(f"{ROOT / 'configs' / 'demo.py'}:tiny", {}, None)
    spec = bench.model_spec(config.model, image_size=config.data.image_size)
    assert "ViT" in bench.reference_support(config, spec)
    with pytest.raises(bench.Skip, match="ViT"):
        bench.ReferenceRunner(config, spec, 64, bench.synthetic_batch(config, 64))


def test_synthetic_captions_end_in_the_highest_id(bench):
    config = bench.openclip_compare_config()
    text = bench.synthetic_batch(config, 512)["text"]
    last = (text != 0).sum(1) - 1
    # Argmax-token pooling (open_clip) and last-real-token pooling (clipjax) read one position.
    assert (text.argmax(1) == last).all() and (text[range(len(text)), last] == 511).all()


@pytest.mark.parametrize(
    "pools",
    [
        [],
        [
            "--set",
            "model.image.pool=mean",
            "--set",
            "model.text.pool=mean",
            "--set",
            "model.text.causal=False",
        ],
    ],
    ids=["cls-last-causal", "mean-mean"],
)
def test_reference_computes_clipjax_loss_from_the_same_weights(bench, pools):
    import jax
    from flax import nnx

    from clipjax.losses.contrastive import reference_infonce_loss
    from clipjax.models import model_factory

    args = bench.parse_args([*TINY, *pools])
    config, _ = bench.load_config(bench.DEFAULT_PRESET, args.overrides, args.batch)
    spec = bench.model_spec(config.model, image_size=config.data.image_size)
    # Built and run under jit, as the trainer does (eager flax is far slower to start).
    make_model = model_factory(config, vocab_size=64)
    graphdef, _ = nnx.split(nnx.eval_shape(make_model))
    clipjax_params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model(), nnx.Param)))()
    batch = bench.synthetic_batch(config, 64)

    @jax.jit
    def clipjax_loss(params, batch):
        img, txt = nnx.merge(graphdef, params)(batch["image"], batch["text"])
        return reference_infonce_loss(img, txt, params["logit_scale"])

    expected = float(clipjax_loss(clipjax_params, batch))
    params = bench.reference_params_from_clipjax(clipjax_params)
    assert bench.count(params) == bench.count(clipjax_params)
    got = float(
        jax.jit(bench.reference_loss, static_argnums=(2, 3))(params, batch, spec, jax.lax.Precision.HIGHEST)
    )
    assert got == pytest.approx(expected, rel=1e-5)
