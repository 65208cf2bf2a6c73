"""Losses: InfoNCE and sigmoid over the global batch, all-gathered or in an O(B)-memory ring,
with gradients equal to one device's, and false-negative-aware objectives (multi-positive, FNC,
DCL, soft targets, SogCLR) in image-text and image-image mode; `objective_loss` computes the
one `config.loss` names. Adding one is a function of a `LossContext` and a `register_objective`
line in its file (imported below)."""

from clipjax.losses.registry import (  # noqa: F401
    LOSS_IMPLS,
    OBJECTIVES,
    LossContext,
    check_loss_config,
    contrastive_loss,
    init_loss_state,
    loss_section,
    objective_loss,
    register_objective,
)

# Built-in objectives: importing a module registers the objectives whose math it holds
# (objectives.py: the plain ones, whose image-image form it computes, and the false-negative-
# aware ones; sogclr.py), in the order of `loss.name`'s choices and `config.loss`'s fields.
from clipjax.losses.blockwise import ring_infonce_loss, ring_sigmoid_loss  # noqa: F401
from clipjax.losses.contrastive import (  # noqa: F401
    alignment_only_loss,
    global_infonce_loss,
    global_sigmoid_loss,
    reference_infonce_loss,
    reference_sigmoid_loss,
)
from clipjax.losses.objectives import Objective, objective_mean, objective_rows  # noqa: F401
from clipjax.losses import sogclr  # noqa: F401
