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
stays in memory is the embeddings ([images + captions, d] floats), the captions and a hash per
record. With several processes, each reads its contiguous share of the records twice: first
for the hashes of its images and their captions (nothing decoded), which every process then
sees, so that an image belongs to the process of its first record; then to decode and embed
the images it owns. Images are numbered in the order of their first record, captions keep the
records' order, and only embeddings, hashes and captions are gathered: every figure is the one a
single process reading everything gives. The
recalls are `clipjax.evals.retrieval.multi_caption_retrieval`: image -> text counts any of the
image's captions, text -> image each caption's own image, ties counted against the query.
"""

from __future__ import annotations

import collections
import hashlib

import jax
import numpy as np
from PIL import Image

from clipjax.evals import classification_data as tfds_files
from clipjax.data.images import decode_image, fit_crop
from clipjax.captions import decode_caption
from clipjax.data.process_state import process_rows
from clipjax.data.records import feature_keys, read_pairs
from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.embed import gather_objects, gather_rows, sum_counters
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
        rows = process_rows(n, jax.process_index(), jax.process_count())

        def share_pairs(skipped: collections.Counter):
            """(image bytes, captions) of this process's records that have both, in order."""
            for chunk in raw.chunks(rows.stop, batch, start=rows.start):
                images, captions = read_pairs(chunk, s["image_key"], s["caption_key"])
                for image, texts in zip(images, captions):
                    texts = [t for t in map(decode_caption, texts) if t]
                    if image is None:
                        skipped["no_image"] += 1
                    elif not texts:
                        skipped["no_caption"] += 1
                    else:
                        yield image, texts

        # First read: which image each record holds (by hash) and its captions; nothing decoded.
        skipped: collections.Counter = collections.Counter()
        records = [(hashlib.sha1(image).digest(), texts) for image, texts in share_pairs(skipped)]
        # An image belongs to the process of its first record: only that one decodes and embeds it.
        seen: set[str] = set()
        owned_by = []
        for part in gather_objects([h.hex() for h in dict.fromkeys(h for h, _ in records)]):
            owned_by.append([h for h in part if h not in seen])
            seen.update(part)
        owned = {bytes.fromhex(h) for h in owned_by[jax.process_index()]}
        # Second read: decode this process's images and embed them a call at a time; every process
        # makes as many calls as the one that owns most images.
        per_call = encoders.local_batch_size(batch)
        calls = -(-max(map(len, owned_by)) // per_call)
        size, crop = self.config.data.image_size, fit_crop(self.config.model.get("image_resize", "crop"))
        decoded, bad, embedded, pending = [], [], [], []

        def embed(final=False):
            while len(pending) >= per_call or (final and len(embedded) < calls):
                images = np.stack(pending[:per_call]) if pending else np.zeros((0, size, size, 3), np.uint8)
                del pending[:per_call]
                embedded.append(encoders.local_image(images, per_call, batch_size=batch))

        for image, _ in share_pairs(collections.Counter()):
            key = hashlib.sha1(image).digest()
            if key not in owned:
                continue
            owned.discard(key)
            try:
                pending.append(decode_image(image, size, Image.BICUBIC, crop=crop))
                decoded.append(key)
            except Exception:  # PIL raises many types for corrupt files
                bad.append(key)
            embed()
        embed(final=True)
        self.log(
            f"evals.{self.name}: {name} {split}: {len(rows)} records read, {len(decoded)} images embedded"
        )
        # Images are numbered in the order of their first record, as one process reading all would.
        everyone = gather_objects({"decoded": [h.hex() for h in decoded], "bad": [h.hex() for h in bad]})
        index_of = {
            bytes.fromhex(h): i for i, h in enumerate(h for part in everyone for h in part["decoded"])
        }
        if not index_of:
            raise SkipEvaluation(f"{name} split {split!r} has no image with a caption")
        unreadable = {bytes.fromhex(h) for part in everyone for h in part["bad"]}
        texts, caption_image = [], []
        for key, captions in records:
            if key in unreadable:
                skipped["bad_image"] += 1
                continue
            texts += captions
            caption_image += [index_of[key]] * len(captions)
        pairs = gather_objects({"texts": texts, "images": caption_image})
        skipped = sum_counters(skipped)
        result = multi_caption_retrieval(
            gather_rows(np.concatenate(embedded)),
            encoders.text([t for part in pairs for t in part["texts"]]),
            np.asarray([i for part in pairs for i in part["images"]]),
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
