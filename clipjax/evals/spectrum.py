"""The embedding spectrum of the fixed held-out set: comparable across checkpoints and runs."""

from __future__ import annotations

import jax

from clipjax.evals.base import Evaluator, register_evaluator
from clipjax.metrics import reference_embedding_metrics, split_spectra


@register_evaluator
class EmbeddingSpectrumEvaluator(Evaluator):
    """Spectrum, effective rank, alignment/uniformity and modality gap of the held-out embeddings."""

    kind = "embedding"

    def run(self, encoders):
        # A covariance spectrum needs the rows together: the embeddings are gathered (each
        # process encoded its share), [N, d] floats on each host.
        image_emb, text_emb = self.data.heldout_embeddings(encoders)
        metrics = reference_embedding_metrics(
            image_emb,
            text_emb,
            self.data.heldout_fields["text_id"],
            encoders.logit_scale,
            encoders.logit_bias,
        )
        scalars, spectra = split_spectra(jax.device_get(metrics))
        return {
            "num_examples": int(len(image_emb)),
            "embedding": {**scalars, **{k: v.tolist() for k, v in spectra.items()}},
        }
