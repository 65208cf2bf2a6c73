"""Image-text retrieval benchmarks with several captions per image: COCO (Karpathy 5k test),
Flickr30k (1k test), or the user's own captioned images.

The dataset is a prepared tensorflow-datasets dataset read by name (`coco_captions`, whose
`test` split is Karpathy's 5,000 images with 5 captions each), or any prepared tfds dataset
whose records hold an encoded image and a caption or a list of captions: `image_key` and
`caption_key` name them ("captions/text" walks into coco_captions' Sequence of {text, id}).
Records that carry the same image bytes are one image with all their captions, so one caption
per record works too: a CSV that lists each Flickr30k image five times, once per caption,
converted by `python -m clipjax.data.convert` (the image_text_folder dataset, `caption_key`
"caption") is scored as 1,000 images and 5,000 captions.

The split is streamed: records are read, images decoded and embedded a batch at a time; what
stays in memory is the embeddings ([images + captions, d] floats) and a hash per image. With
several processes, each reads and decodes every record (an image's index depends on all the
records before it), encodes its share of each batch, and gets the batch's embeddings back. The
recalls are `clipjax.evals.retrieval.multi_caption_retrieval`: image -> text counts any of the
image's captions, text -> image each caption's own image, ties counted against the query.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
from PIL import Image

from clipjax.evals import classification_data as tfds_files
from clipjax.data.images import decode_image, fit_crop
from clipjax.captions import decode_caption
from clipjax.data.records import feature_keys, read_pairs
from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.retrieval import multi_caption_retrieval
from clipjax.schema import ConfigError, Field


@register_evaluator
class CaptionRetrievalEvaluator(Evaluator):
    """Image <-> text R@1/5/10 on a tfds dataset with several captions per image (COCO, Flickr30k)."""

    kind = "caption_retrieval"
    FIELDS = {
        "dataset": Field("", "tfds name in data_dir, e.g. `coco_captions`, or a converted own dataset"),
        "data_dir": Field("", "where it is prepared (empty: data.data_dir)"),
        "split": Field("test", "split evaluated (coco_captions' test split is Karpathy's 5k)"),
        "image_key": Field("image", "the encoded image feature"),
        "caption_key": Field("captions/text", "the caption feature: text or a list of texts"),
        "max_examples": Field(0, "records read (0: the whole split)", minimum=0),
        "batch_size": Field(0, "images and captions per encoder call (0: evals.batch_size)", minimum=0),
    }

    @classmethod
    def check(cls, settings, config, path):
        if not settings["dataset"]:
            raise ConfigError(f"{path}.dataset: name a prepared tfds image-text dataset (e.g. coco_captions)")
        data_dir = settings["data_dir"] or config.data.data_dir
        try:
            builder = tfds_files.get_builder(settings["dataset"], data_dir)
            tfds_files.split_size(settings["dataset"], data_dir, settings["split"])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{path}.dataset: {str(e).splitlines()[0]}") from None
        try:
            feature_keys(builder, settings["image_key"], settings["caption_key"])
        except ConfigError as e:
            raise ConfigError(
                str(e)
                .replace("data.tfds_image_key", f"{path}.image_key")
                .replace("data.tfds_caption_key", f"{path}.caption_key")
            ) from None

    def run(self, encoders):
        s = self.settings
        data_dir = s["data_dir"] or self.config.data.data_dir
        name, split = s["dataset"], s["split"]
        builder = tfds_files.get_builder(name, data_dir)
        raw = tfds_files.RawRecords(builder, split)
        n = raw.size if not s["max_examples"] else min(s["max_examples"], raw.size)
        batch = s["batch_size"] or self.config.evals.batch_size
        size = self.config.data.image_size

        crop = fit_crop(self.config.model.get("image_resize", "crop"))
        image_of_hash: dict[bytes, int] = {}
        caption_image: list[int] = []
        pending_images, pending_texts = [], []
        image_emb, text_emb = [], []
        skipped: collections.Counter = collections.Counter()

        def flush(final: bool = False) -> None:
            if pending_images and (final or len(pending_images) >= batch):
                image_emb.append(encoders.image(np.stack(pending_images)))
                pending_images.clear()
            if pending_texts and (final or len(pending_texts) >= batch):
                text_emb.append(encoders.text(pending_texts))
                pending_texts.clear()

        read = 0
        for chunk in raw.chunks(n, batch):
            images, captions = read_pairs(chunk, s["image_key"], s["caption_key"])
            for image, texts in zip(images, captions):
                texts = [t for t in map(decode_caption, texts) if t]
                if image is None:
                    skipped["no_image"] += 1
                    continue
                if not texts:
                    skipped["no_caption"] += 1
                    continue
                key = hashlib.sha1(image).digest()
                index = image_of_hash.get(key)
                if index is None:
                    try:
                        pending_images.append(decode_image(image, size, Image.BICUBIC, crop=crop))
                    except Exception:  # PIL raises many types for corrupt files
                        skipped["bad_image"] += 1
                        continue
                    index = image_of_hash[key] = len(image_of_hash)
                caption_image += [index] * len(texts)
                pending_texts += texts
            read += len(chunk)
            flush()
            self.log(f"evals.{self.name}: {name} {split} {read}/{n} records, {len(image_of_hash)} images")
        flush(final=True)
        if not image_of_hash:
            raise SkipEvaluation(f"{name} split {split!r} has no image with a caption")
        result = multi_caption_retrieval(
            np.concatenate(image_emb), np.concatenate(text_emb), np.asarray(caption_image)
        )
        result["split"] = split
        if skipped:
            result["skipped"] = dict(skipped)
        return {"caption_retrieval": {name: result}}


def benchmark_sections() -> dict[str, dict]:
    """The retrieval benchmarks as `config.evals` sections (disabled until enabled): COCO's
    Karpathy 5k test from tfds, and Flickr30k's 1k test as the user converts it (tfds has no
    Flickr30k): a CSV with each test image once per caption, whose converted dataset's name
    the converter prints (docs/evaluation.md)."""
    return {
        "coco": {"dataset": "coco_captions", "split": "test"},
        "flickr30k": {"dataset": "", "split": "train", "caption_key": "caption"},
    }
