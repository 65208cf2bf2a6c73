"""The evaluation report: what the evaluators returned, as report.json, report.md and summary lines.

report.json format (stable; scripts read it):
  step: int, num_examples: int
  zero_shot.<attribute>.top1 (and .top5 with more than 5 classes, .per_class.<name>), zero_shot.mean_top1
  zero_shot.<attribute>.class_names_unknown_to_tokenizer: [names]   (only when some prompt cannot read them)
  retrieval.image_to_text.R@1|R@5|R@10|median_rank   (concept-aware: same concept counts as a hit)
  retrieval.text_to_image.R@1|R@5|R@10|median_rank
  retrieval.strict.image_to_text.*, retrieval.strict.text_to_image.*   (own pair only)
  linear_probe.top1|regularizer|val_top1, knn.top1@k1|top1@k10|top1@k20   (frozen image features, dataset labels)
  linear_probe.fields.<field>, knn.fields.<field>, logistic_probe.fields.<field>
      (top-1 on another label field: `evals.<name>.fields`)
  embedding.*   (spectrum metrics of the evaluation embeddings)
  classification.<dataset>.dataset|split|num_examples, .zero_shot.top1|top5|num_classes,
      .linear_probe.*, .logistic_probe.*, .few_shot.*, .knn.*, .skipped.<reason>   (classification evaluators)
  caption_retrieval.<dataset>.split|num_images|num_captions, .image_to_text.R@1|R@5|R@10|median_rank|mean_rank,
      .text_to_image.*, .skipped.<reason>   (caption_retrieval evaluators: COCO, Flickr30k, own data)
  logistic_probe.top1|regularizer|validation_top1, few_shot.<k>shot   (probes on the held-out data)
  captioning.cross_entropy|perplexity (teacher-forced, held-out captions), .generated|mean_words,
      .attributes.<name>|all.stated|accuracy, .samples: [{generated, reference}]   (models with a decoder)
      .referring.boxes|mean_iou|iou_50   (a LocCa decoder: boxes written for held-out captions)
  dense_probe.images|patches|object_share|miou|color_accuracy   (per-patch probes; sources with object masks)
  skipped.<evaluator section>: why it did not run (no labels, no class names, ...)
  timing.setup_s|train_s|eval_s   (end of training only)
Each entry comes from the evaluator of the same name (clipjax.evals); `flatten_report` turns the
numbers into 'eval/...' scalars for metrics.jsonl.
"""

from __future__ import annotations

import json

from clipjax import paths
from clipjax.metric_writer import to_jsonable
from clipjax.metrics.plot import plot_spectrum_history
from clipjax.run_store import layout


def write_report(report: dict, path: str) -> None:
    """Written whole (local or bucket): a script polling for report.json never reads half of it."""
    paths.write_atomic(path, json.dumps(to_jsonable(report), indent=2, sort_keys=True))


def summary_lines(report: dict) -> list[str]:
    lines = [f"evaluation at step {report.get('step')} on {report.get('num_examples')} held-out examples"]
    for attribute, result in report.get("zero_shot", {}).items():
        if isinstance(result, dict):
            extra = f"  top-5 {result['top5']:.2%}" if "top5" in result else ""
            lines.append(f"  zero-shot {attribute:<10} top-1 {result['top1']:.2%}{extra}")
    for name in ("linear_probe", "logistic_probe", "knn"):
        if name in report:
            lines.append(
                f"  {name:<24} " + "  ".join(f"{k} {v:.2%}" for k, v in report[name].items() if "top1" in k)
            )
            for field, value in report[name].get("fields", {}).items():
                lines.append(f"  {name + ' ' + field:<24} top1 {value:.2%}")
    for dataset, result in report.get("classification", {}).items():
        parts = [
            f"{n} {v:.2%}"
            for n, v in (
                ("zero-shot top-1", result.get("zero_shot", {}).get("top1")),
                ("top-5", result.get("zero_shot", {}).get("top5")),
                ("probe", result.get("linear_probe", {}).get("top1")),
                ("logistic", result.get("logistic_probe", {}).get("top1")),
                ("kNN@20", result.get("knn", {}).get("top1@k20")),
            )
            if v is not None
        ]
        lines.append(f"  {dataset:<24} " + "  ".join(parts) + f"  ({result.get('num_examples')} images)")
    retrieval = report.get("retrieval")
    if retrieval:
        for direction in ("image_to_text", "text_to_image"):
            r, s = retrieval[direction], retrieval["strict"][direction]
            lines.append(
                f"  {direction:<14} R@1 {r['R@1']:.3f}  R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}"
                f"   (strict R@1 {s['R@1']:.3f})"
            )
    for dataset, r in report.get("caption_retrieval", {}).items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(
            f"  {dataset:<24} image->text R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f}  "
            f"text->image R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f}  "
            f"({r['num_images']} images, {r['num_captions']} captions)"
        )
    captioning = report.get("captioning")
    if captioning:
        line = f"  captioning     perplexity {captioning['perplexity']:.3f}"
        attributes = captioning.get("attributes", {}).get("all")
        if attributes:
            line += (
                f"  generated captions' attributes {attributes['accuracy']:.2%} correct"
                f" ({attributes['stated']:.0%} stated)"
            )
        referring = captioning.get("referring")
        if referring:
            line += (
                f"  referring boxes IoU {referring['mean_iou']:.3f} (IoU >= 0.5: {referring['iou_50']:.1%})"
            )
        lines.append(line)
    dense = report.get("dense_probe")
    if dense:
        lines.append(
            f"  dense_probe    object/background mIoU {dense['miou']:.3f}  patch colour "
            f"{dense['color_accuracy']:.2%}  ({dense['images']} images x {dense['patches']} patches)"
        )
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"  skipped {name}: {reason}")
    return lines


def _captioning_table(report: dict) -> list[str]:
    captioning = report.get("captioning")
    if not captioning:
        return []
    lines = [
        "## Captioning",
        "",
        f"Held-out captions: cross-entropy {captioning['cross_entropy']:.4f} per token, "
        f"perplexity {captioning['perplexity']:.3f}.",
        "",
    ]
    attributes = captioning.get("attributes")
    if attributes:
        lines += [
            f"Generated captions of {captioning['generated']} held-out images: what they state, and how "
            "much of it is right.",
            "",
            "| attribute | stated | correct when stated |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {k} | {v['stated']:.1%} | {v['accuracy']:.2%} |" for k, v in attributes.items()]
        lines.append("")
    referring = captioning.get("referring")
    if referring:
        lines += [
            f"Boxes the decoder writes for the captions of {referring['boxes']} held-out images (referring "
            f"expression): mean IoU with the true box {referring['mean_iou']:.3f}, IoU >= 0.5 for "
            f"{referring['iou_50']:.1%}.",
            "",
        ]
    samples = captioning.get("samples")
    if samples:
        lines += ["| generated | the image's own caption |", "| --- | --- |"]
        lines += [f"| {s['generated']} | {s['reference']} |" for s in samples]
        lines.append("")
    return lines


def _caption_retrieval_table(report: dict) -> list[str]:
    results = report.get("caption_retrieval", {})
    if not results:
        return []
    lines = [
        "## Retrieval benchmarks (several captions per image)",
        "",
        "| dataset | split | images | captions | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dataset, r in results.items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        lines.append(
            f"| {dataset} | {r.get('split', '')} | {r['num_images']} | {r['num_captions']} "
            + "".join(f"| {i2t[k]:.3f} " for k in ("R@1", "R@5", "R@10"))
            + "".join(f"| {t2i[k]:.3f} " for k in ("R@1", "R@5", "R@10"))
            + "|"
        )
    return lines + [""]


def _classification_table(report: dict) -> list[str]:
    results = report.get("classification", {})
    if not results:
        return []
    lines = [
        "## Classification benchmarks",
        "",
        "| dataset | split | images | zero-shot top-1 | top-5 | linear probe | logistic probe | kNN@20 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    for dataset, r in results.items():
        lines.append(
            f"| {dataset} | {r.get('split', '')} | {r.get('num_examples')} "
            f"| {pct(r.get('zero_shot', {}).get('top1'))} | {pct(r.get('zero_shot', {}).get('top5'))} "
            f"| {pct(r.get('linear_probe', {}).get('top1'))} | {pct(r.get('logistic_probe', {}).get('top1'))} "
            f"| {pct(r.get('knn', {}).get('top1@k20'))} |"
        )
    return lines + [""]


def write_markdown(report: dict, out: str, workdir: str) -> str:
    """report.md: the same numbers as report.json, as tables, with the spectrum plots."""
    lines = [f"# Evaluation of {paths.resolve(workdir)} at step {report['step']}", ""]
    if "num_examples" in report:  # set by the evaluators of the held-out data
        lines += [f"{report['num_examples']} held-out examples.", ""]
    zero_shot = {k: v for k, v in report.get("zero_shot", {}).items() if isinstance(v, dict)}
    if zero_shot:
        lines += ["## Zero-shot classification", "", "| attribute | top-1 | top-5 |", "| --- | --- | --- |"]
        for name, r in zero_shot.items():
            top5 = f"{r['top5']:.2%}" if "top5" in r else "-"
            lines.append(f"| {name} | {r['top1']:.2%} | {top5} |")
        lines.append(f"| mean | {report['zero_shot']['mean_top1']:.2%} | |")
        lines.append("")
    retrieval = report.get("retrieval")
    if retrieval:
        lines += [
            "## Retrieval",
            "",
            "| direction | R@1 | R@5 | R@10 | median rank |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, r in (
            ("image -> text (same concept)", retrieval["image_to_text"]),
            ("text -> image (same concept)", retrieval["text_to_image"]),
            ("image -> text (own caption)", retrieval["strict"]["image_to_text"]),
            ("text -> image (own image)", retrieval["strict"]["text_to_image"]),
        ):
            lines.append(
                f"| {label} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | {r['median_rank']:.0f} |"
            )
        lines.append("")
    lines += _classification_table(report)
    lines += _caption_retrieval_table(report)
    lines += _captioning_table(report)
    embedding = report.get("embedding")
    if embedding:
        lines += ["## Embedding space (held-out probe set)", "", "| metric | value |", "| --- | --- |"]
        for key in sorted(k for k, v in embedding.items() if not isinstance(v, list)):
            lines.append(f"| {key} | {embedding[key]:.4g} |")
        probe = {"step": report["step"], **embedding}
        plot_spectrum_history([probe], paths.join(out, layout.PROBE_SPECTRUM_PLOT))
        lines += ["", f"![probe-set spectrum]({layout.PROBE_SPECTRUM_PLOT})", ""]
        spectrum = paths.join(workdir, layout.SPECTRUM_PLOT)
        if paths.exists(spectrum):
            lines += [
                "Spectrum over training:",
                "",
                f"![training spectrum]({paths.relative(spectrum, out)})",
                "",
            ]
    skipped = report.get("skipped", {})
    if skipped:
        lines += ["## Not evaluated", ""] + [
            f"- `evals.{name}`: {reason}" for name, reason in skipped.items()
        ]
        lines.append("")
    path = paths.join(out, layout.REPORT_MARKDOWN)
    paths.write_atomic(path, "\n".join(lines))
    return path


def flatten_report(report: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a report as 'prefix/a/b/c' scalars (for metrics.jsonl and TensorBoard)."""
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(flatten_report(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[f"{prefix}{key}"] = value
    return out
