"""Losses: InfoNCE and sigmoid over the global batch, all-gathered or in an O(B)-memory ring,
with gradients equal to one device's; `contrastive_loss` picks the one `config.loss` names."""

from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss  # noqa: F401
from clipjax.losses.contrastive import (  # noqa: F401
    alignment_only_loss,
    global_infonce_loss,
    global_sigmoid_loss,
    reference_infonce_loss,
    reference_sigmoid_loss,
)
from clipjax.losses.select import LOSS_IMPLS, LOSS_NAMES, contrastive_loss  # noqa: F401
