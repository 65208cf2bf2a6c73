"""Empty batches embed to [0, d]."""

import jax
import numpy as np

from clipjax import api
from clipjax.pretrained import workdir
from tests.test_pretrained import FIXTURES

S = 32


def test_empty_batches_embed_to_no_rows_of_the_embedding_width():
    keys, params, vocab = workdir.read_source("hf_clip", str(FIXTURES / "hf_clip"))
    config, graphdef, params = workdir.assemble(keys, params, vocab)
    model = api.TrainedModel(config, 0, None, api.eval_mesh(jax.devices()[:1]), graphdef, params)
    d = int(model.config.model.embed_dim)
    for empty in (np.zeros((0, S, S, 3), np.uint8), np.zeros((0, 50, 70, 3), np.float32), []):
        emb = model.encode_image(empty)
        assert emb.shape == (0, d) and emb.dtype == np.float32
    images_emb = model.encode_image(np.zeros((61, 97, 3), np.uint8))
    assert model.similarity(model.encode_image([]), images_emb).shape == (0, 1)
    assert model.similarity(images_emb, np.zeros((0, d), np.float32)).shape == (1, 0)
