"""Losses: InfoNCE and sigmoid over the global batch, all-gathered or in an O(B)-memory ring,
with gradients equal to one device's, and false-negative-aware objectives (multi-positive, FNC,
DCL, soft targets, SogCLR) in image-text and image-image mode; `objective_loss` computes the
one `config.loss` names."""

from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss  # noqa: F401
from clipjax.losses.contrastive import (  # noqa: F401
    alignment_only_loss,
    global_infonce_loss,
    global_sigmoid_loss,
    reference_infonce_loss,
    reference_sigmoid_loss,
)
from clipjax.losses.objectives import Objective, objective_mean, objective_rows  # noqa: F401
from clipjax.losses.select import (  # noqa: F401
    FALSE_NEGATIVE_LOSSES,
    LOSS_IMPLS,
    LOSS_NAMES,
    contrastive_loss,
    init_loss_state,
    objective_loss,
)
