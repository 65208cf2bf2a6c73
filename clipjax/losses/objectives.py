"""False-negative-aware contrastive objectives over the global batch, gathered or in a ring.

A large batch holds several samples of one concept, and InfoNCE pushes each of them away from
its anchor as hard as a true negative: the larger the batch, the more of its gradient is spent
undoing what the model should learn (with K balanced classes, 1 - (1 - 1/K)^(B-1) of anchors
meet one). The objectives here stop punishing true similarities, each with its own knowledge:

  multi_positive            ids (the caption, or the concept label as a study's oracle) mark
                            extra positives; SupCon with the positives' mass summed inside the log
  multi_positive_sigmoid    SigLIP with z = +1 on every pair of one id
  fnc                       no labels: the anchor's most similar candidates above a threshold
                            are taken as false negatives, then eliminated or attracted
  dcl                       no labels: the denominator debiased by a class prior tau+
  soft_targets              no labels: part of the target mass spread by intra-modal similarity
  sogclr                    per-sample moving averages of the negative sum (`clipjax.losses.sogclr`)
  softmax, sigmoid          the plain losses, so image-image mode (NT-Xent) has them too

Every objective is a mean over anchors of a row loss over the anchor's candidates, in one of
two modes. Image-text (`intra=False`): image i scores all texts and text i all images, the
positive is the pair's other half. Image-image (`intra=True`, SimCLR): the 2B views are anchors,
a_i scores all b_j and the a_j with j != i, its positive is b_i (and the other way round). So a
row meets candidates in two groups: the cross side (all columns, the positive among them) and,
in image-image mode only, its own side (all columns but itself). Writing each objective once
against this pair of groups is what keeps the two modes, and the two forms below, one code.

Row losses, with l the row's logits (exp(logit_scale) * similarity), C its candidates, p its
positive and lse a log-sum-exp:

    softmax           lse_C(l) - l_p
    multi_positive    lse_C(l) - lse_P(l)            (form "in"; P: candidates of p's id)
                      lse_C(l) - mean_P(l)           (form "out", SupCon's L_out)
    fnc eliminate     lse_{C - D}(l) - l_p           (D: detected false negatives)
    fnc attract       multi_positive with P = {p} + D
    dcl               log(e^l_p + Ng) - l_p,  Ng = max((sum_n e^l_n - N tau+ e^l_p) / (1 - tau+),
                                                       N e^(-exp(logit_scale)))
    soft_targets      lse_C(l) - sum_j t_j l_j,  t = (1 - alpha) onehot(p) + alpha softmax(sim / T)
    sigmoid kinds     sum_C softplus(-z l)       (z = +1 on positives, l with the bias)

The loss is the mean of the 2B row losses: for the sigmoid kinds in image-text mode that
counts each pair from both ends, sum over pairs / B, SigLIP's normalisation.

Why "in" is multi_positive's default: -log sum_P softmax(l) <= -log softmax(l)_p because P
holds p, so with the oracle's labels the loss is never above plain InfoNCE on the same batch
(a fact the studies lean on: the oracle can only remove penalty). The "out" form averages the
log-probabilities instead, and a positive less similar than p then raises the row's loss
above InfoNCE's: it keeps pulling every same-class sample equally close, which SupCon found
trains better with labels, so it stays available. With all ids distinct both equal InfoNCE.

fnc detection uses no gradient and no label: among the items j != i (in image-image mode the
two views of item j are one item, removed or attracted together) those among the anchor's
`top_k` highest cross-side cosines (a_i with b_j, b_i with a_j) that reach `threshold`. Equal
similarities are ranked by the lower global index (`jax.lax.top_k`'s rule), a rule the ring
keeps by sorting on (similarity, index) whatever order the blocks arrive in.

Two forms compute the same numbers:

  gather  each device all-gathers both sides and scores its local rows against the whole
          batch at once (b x B logits, b x 2B in image-image mode), like `contrastive.py`.
  ring    both sides' blocks, stacked as one [2, b, d] array, travel around a `ppermute` ring
          (the pattern of `clipjax.parallel.ring`) and are scored `chunk` columns at a time;
          every row keeps online log-sum-exps (max and sum of exponentials) and sums.
          Statistics that must be complete before the loss can be scored (fnc's top-k, the
          soft targets' normaliser) come from a first lap under stop_gradient, merged tile by
          tile. A block is padded to whole tiles, the padding masked by its global index -1.

Both forms share the per-tile code: the gather form is the ring with one tile holding every
column. Gradients are by autodiff outside the shard_map (the transpose of all_gather is a
reduce-scatter, that of ppermute a ppermute back), not by a hand-written backward as in
`blockwise.py`: six objectives, two modes and their statistics would each need one. In the
ring each tile is a `jax.checkpoint`, so the backward recomputes the tile's logits from its
inputs; what the lap saves is its visiting blocks, O(B d) per device, never b x B logits
(at B = 8,192, d = 32 on 8 devices, fnc in image-image mode: 9 MiB of temporaries against
the gather form's 388 MiB). The running maxima that shift the exponentials are constants to
autodiff (the loss does not depend on them), which also keeps -inf (an empty masked set so
far) out of every gradient.

The plain image-text losses keep their hand-written forms (`contrastive.py`, `blockwise.py`),
which their objectives registered here call in image-text mode: they need less memory (no
saved blocks) than autodiff through a ring does. The end of this module registers every
objective it computes (`clipjax.losses.registry`) with its `config.loss` fields and checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from clipjax.losses.blockwise import default_chunk, ring_infonce_loss, ring_sigmoid_loss
from clipjax.losses.contrastive import alignment_only_loss, global_infonce_loss, global_sigmoid_loss
from clipjax.losses.registry import register_objective
from clipjax.parallel.ring import ring_size as ring_size_of, varying
from clipjax.schema import ConfigError, Field

# The objectives this module computes (`alignment` and the image-text plain losses stay in
# `contrastive.py` / `blockwise.py`).
KINDS = (
    "softmax",
    "sigmoid",
    "multi_positive",
    "multi_positive_sigmoid",
    "fnc",
    "dcl",
    "soft_targets",
    "sogclr",
)
MULTI_POSITIVE_FORMS = ("in", "out")
FNC_MODES = ("eliminate", "attract")
_SIGMOID_KINDS = ("sigmoid", "multi_positive_sigmoid")

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective and its settings (see the module docstring); `sogclr` here gives log g."""

    name: str
    intra: bool = False
    multi_positive_form: str = "in"
    fnc_mode: str = "eliminate"
    fnc_top_k: int = 5
    fnc_threshold: float = 0.8
    dcl_class_prior: float = 0.01
    soft_target_weight: float = 0.2
    soft_target_temperature: float = 0.1

    def __post_init__(self):
        if self.name not in KINDS:
            raise ValueError(f"unknown objective {self.name!r} (expected one of {KINDS})")
        if self.multi_positive_form not in MULTI_POSITIVE_FORMS:
            raise ValueError(
                f"multi_positive_form {self.multi_positive_form!r} not in {MULTI_POSITIVE_FORMS}"
            )
        if self.fnc_mode not in FNC_MODES:
            raise ValueError(f"fnc_mode {self.fnc_mode!r} not in {FNC_MODES}")
        if not 0.0 <= self.dcl_class_prior < 1.0:
            raise ValueError(f"dcl_class_prior {self.dcl_class_prior} must lie in [0, 1)")

    @property
    def uses_ids(self) -> bool:
        return self.name in ("multi_positive", "multi_positive_sigmoid")

    @property
    def uses_bias(self) -> bool:
        return self.name in _SIGMOID_KINDS

    @property
    def attracts(self) -> bool:
        """Whether rows have a set of positives (rather than the pair's other half alone)."""
        return self.name == "multi_positive" or (self.name == "fnc" and self.fnc_mode == "attract")

    def negatives(self, global_batch: int) -> int:
        """N, the candidates of a row other than its positive."""
        return 2 * global_batch - 2 if self.intra else global_batch - 1


# ---------------------------------------------------------------- per-tile arithmetic
#
# Both sides are scored at once: the local rows are stacked as x = [a; b] ([2, b, d]) and a
# tile's columns as y = [a_t; b_t] ([2, w, d]), so side s meets its own side in y[s] and the
# cross side in y[1 - s]. Row statistics are [2, b] arrays. One copy of the arithmetic for the
# two sides halves the program XLA compiles (and each lap sends one array, not two).


def _fold_lse(state, terms):
    """Fold masked logits into a running (max, sum of exp(logit - max)) per row.

    `terms`: (logits [2, b, w], mask broadcastable to it, or None). A row whose masked set is
    empty so far keeps max -inf and sum 0.
    """
    running_max, running_sum = state
    masked = [x if mask is None else jnp.where(mask, x, -jnp.inf) for x, mask in terms]
    new_max = running_max
    for x in masked:
        new_max = jnp.maximum(new_max, jnp.max(x, axis=-1))
    new_max = sg(new_max)
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    # Exponentials summed and one log taken at the end (as in blockwise.py): the rounding stays
    # relative to the sum rather than growing with |lse| at every tile.
    new_sum = running_sum * jnp.exp(running_max - shift)
    for x in masked:
        new_sum = new_sum + jnp.sum(jnp.exp(x - shift[..., None]), axis=-1)
    return new_max, new_sum


def _scores(x, y, precision):
    """[2, b, w] dot products of each side's rows with the columns `y` [2, w, d] it meets."""
    return jnp.einsum("sbd,swd->sbw", x, y, precision=precision)


def _merge_top_k(state, sim, cols, k):
    """The k largest (similarity, -index) pairs of a row: the running ones merged with a tile's.

    Sorting on (-similarity, index) ranks ties by the lower global index whatever the order the
    tiles come in, so the ring detects exactly what the gathered row's top-k does.
    """
    values, index = state
    cols = jnp.broadcast_to(cols, sim.shape)
    if sim.shape[-1] > k:
        # A tile's columns are in ascending global order, so top_k's rule (the lower position
        # first among equals) is the lower index's; only the k survivors are sorted.
        sim, best = jax.lax.top_k(sim, k)
        cols = jnp.take_along_axis(cols, best, axis=-1)
    values = jnp.concatenate([values, sim], axis=-1)
    index = jnp.concatenate([index, cols], axis=-1)
    negated, index = jax.lax.sort((-values, index), dimension=values.ndim - 1, num_keys=2)
    return -negated[..., :k], index[..., :k]


def _init_stats(obj: Objective, b: int, axes):
    stats = {}
    if obj.name == "fnc":
        stats["top_k"] = (
            varying(jnp.full((2, b, obj.fnc_top_k), -jnp.inf, jnp.float32), axes),
            varying(jnp.full((2, b, obj.fnc_top_k), -1, jnp.int32), axes),
        )
    if obj.name == "soft_targets":
        stats["soft"] = (
            varying(jnp.full((2, b), -jnp.inf, jnp.float32), axes),
            varying(jnp.zeros((2, b), jnp.float32), axes),
        )
    return stats


def _fold_stats(obj: Objective, x, row_index, precision, stats, tile):
    """Both sides' statistics over one tile; all inputs are stop-gradient values."""
    y, _, cols = tile
    valid = cols[None, :] >= 0  # the ring's padding is no column
    stats = dict(stats)
    if obj.name == "fnc":
        sim = _scores(x, y[::-1], precision)
        sim = jnp.where(valid & (cols[None, :] != row_index[:, None]), sim, -jnp.inf)
        stats["top_k"] = _merge_top_k(stats["top_k"], sim, cols, obj.fnc_top_k)
    if obj.name == "soft_targets":
        sim = _scores(x, y, precision) / obj.soft_target_temperature
        stats["soft"] = _fold_lse(stats["soft"], [(sim, valid)])
    return stats


def _finish_stats(obj: Objective, stats):
    out = {}
    if obj.name == "fnc":
        values, index = stats["top_k"]
        out["detected"] = jnp.where(values >= obj.fnc_threshold, index, -1)
    if obj.name == "soft_targets":
        running_max, running_sum = stats["soft"]
        out["soft_lse"] = running_max + jnp.log(running_sum)
    return out


def _init_acc(obj: Objective, b: int, axes):
    zeros = lambda: varying(jnp.zeros((2, b), jnp.float32), axes)
    empty = lambda: (varying(jnp.full((2, b), -jnp.inf, jnp.float32), axes), zeros())
    name, acc = obj.name, {}
    if name in _SIGMOID_KINDS:
        acc["total"] = zeros()
    elif name in ("dcl", "sogclr"):
        acc["negatives"], acc["positive"] = empty(), zeros()
    else:
        acc["denominator"] = empty()
        if name == "soft_targets":
            acc["target_logit"] = zeros()
        elif obj.attracts and obj.multi_positive_form == "in":
            acc["positives"] = empty()
        elif obj.attracts:
            acc["positive_sum"], acc["positive_count"] = zeros(), zeros()
        else:
            acc["positive"] = zeros()
    return acc


def _fold_tile(obj: Objective, x, row_index, row_ids, stats, scalars, precision, acc, tile):
    """Fold one tile of candidates into the row accumulators of both sides.

    x [2, b, d]: the local rows; tile: columns y [2, w, d], their ids [w] and global indices
    [w] (-1: padding). Masks are [b, w]: the two sides share their rows' indices and ids.
    """
    y, col_ids, cols = tile
    scale, bias = scalars
    own = cols[None, :] == row_index[:, None]  # cross group: the positive; own side: the row itself
    valid = jnp.broadcast_to(cols[None, :] >= 0, own.shape)
    not_self = valid & ~own

    def logits(y):
        out = scale * _scores(x, y, precision)
        return out + bias if obj.uses_bias else out

    cross_logits = logits(y[::-1])
    # (logits, candidate mask, own-positive mask): the cross group, then the row's own side.
    groups = [(cross_logits, valid, own)]
    if obj.intra:
        groups.append((logits(y), not_self, jnp.zeros_like(own)))

    same_id = (col_ids[None, :] == row_ids[:, None]) if obj.uses_ids else None
    detected = None
    if obj.name == "fnc":
        detected = valid & jnp.any(cols[None, None, :, None] == stats["detected"][:, :, None, :], axis=-1)

    def positives(candidates, own_positive):
        if obj.uses_ids:
            return same_id & candidates
        if obj.name == "fnc":
            return own_positive | detected
        return own_positive

    acc = dict(acc)
    name = obj.name
    if name in _SIGMOID_KINDS:
        for lg, cand, own_positive in groups:
            z_logits = jnp.where(positives(cand, own_positive), lg, -lg)
            acc["total"] = acc["total"] + jnp.sum(jnp.where(cand, jax.nn.softplus(-z_logits), 0.0), axis=-1)
        return acc
    if "positive" in acc:
        acc["positive"] = acc["positive"] + jnp.sum(jnp.where(own, cross_logits, 0.0), axis=-1)
    if name in ("dcl", "sogclr"):
        negatives = [(lg, cand & ~own_positive) for lg, cand, own_positive in groups]
        acc["negatives"] = _fold_lse(acc["negatives"], negatives)
        return acc
    if name == "fnc" and obj.fnc_mode == "eliminate":
        acc["denominator"] = _fold_lse(acc["denominator"], [(lg, cand & ~detected) for lg, cand, _ in groups])
    else:
        acc["denominator"] = _fold_lse(acc["denominator"], [(lg, cand) for lg, cand, _ in groups])
    if name == "soft_targets":
        alpha = obj.soft_target_weight
        sim = _scores(sg(x), sg(y), precision) / obj.soft_target_temperature
        soft = jnp.where(valid, jnp.exp(sim - stats["soft_lse"][..., None]), 0.0)
        targets = alpha * soft + jnp.where(own, 1.0 - alpha, 0.0)
        acc["target_logit"] = acc["target_logit"] + jnp.sum(targets * cross_logits, axis=-1)
    elif "positives" in acc:
        acc["positives"] = _fold_lse(acc["positives"], [(lg, positives(c, o)) for lg, c, o in groups])
    elif "positive_sum" in acc:
        for lg, cand, own_positive in groups:
            mask = positives(cand, own_positive)
            acc["positive_sum"] = acc["positive_sum"] + jnp.sum(jnp.where(mask, lg, 0.0), axis=-1)
            acc["positive_count"] = acc["positive_count"] + jnp.sum(mask, axis=-1, dtype=jnp.float32)
    return acc


def _row_losses(obj: Objective, acc, logit_scale, global_batch):
    """[2, b] row losses from the accumulators (for sogclr: log g of each row)."""
    name = obj.name
    if name in _SIGMOID_KINDS:
        return acc["total"]
    if name in ("dcl", "sogclr"):
        neg_max, neg_sum = acc["negatives"]
        positive = acc["positive"]
        n = obj.negatives(global_batch)
        if name == "sogclr":
            return (neg_max - positive) + jnp.log(neg_sum) - math.log(n)
        # Everything in units of exp(shift), the larger of the row's largest logit and its
        # positive: at exp(logit_scale) = 100 the raw exponentials overflow float32.
        shift = sg(jnp.maximum(neg_max, positive))
        pos = jnp.exp(positive - shift)
        neg = neg_sum * jnp.exp(neg_max - shift)
        prior = obj.dcl_class_prior
        # N e^(-1/t): every exp(logit) of unit vectors is at least e^(-exp(logit_scale)).
        floor = n * jnp.exp(-jnp.exp(logit_scale) - shift)
        debiased = jnp.maximum((neg - n * prior * pos) / (1.0 - prior), floor)
        return jnp.log(pos + debiased) + (shift - positive)
    den_max, den_sum = acc["denominator"]
    if name == "soft_targets":
        return (den_max - acc["target_logit"]) + jnp.log(den_sum)
    if "positives" in acc:
        pos_max, pos_sum = acc["positives"]
        return (den_max - pos_max) + jnp.log(den_sum) - jnp.log(pos_sum)
    if "positive_sum" in acc:
        return (den_max - acc["positive_sum"] / acc["positive_count"]) + jnp.log(den_sum)
    return (den_max - acc["positive"]) + jnp.log(den_sum)


# ---------------------------------------------------------------- gather and ring, per device


def _ring_lap(fold, init, blocks, *, axes, size, chunk):
    """`fold(acc, tile)` over every tile of every device's blocks, the blocks going round a ring.

    `blocks` (padded to a multiple of `chunk` columns) are sent on whole at the start of each
    lap step, so the send overlaps the scoring of the block in hand. The last step's send
    brings the blocks home unused: one block of traffic, traded for a single copy of the step
    in the program (`ring.ring_pass` scores the last visitor in a second copy).
    """
    tiles = blocks[-1].shape[0] // chunk
    perm = [(j, (j + 1) % size) for j in range(size)]

    def tile(blocks, start):
        # The embeddings are [2, columns, d], the ids and indices [columns].
        return tuple(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=x.ndim // 3) for x in blocks)

    def score(acc, blocks):
        if tiles == 1:
            return fold(acc, blocks)
        return jax.lax.scan(
            lambda acc, start: (fold(acc, tile(blocks, start)), None),
            acc,
            jnp.arange(tiles, dtype=jnp.int32) * chunk,
        )[0]

    def step(carry, _):
        acc, blocks = carry
        incoming = tuple(jax.lax.ppermute(x, axes, perm) for x in blocks) if size > 1 else blocks
        return (score(acc, blocks), incoming), None

    (acc, _), _ = jax.lax.scan(step, (init, blocks), None, length=size)
    return acc


def _needs_stats(obj: Objective) -> bool:
    return obj.name in ("fnc", "soft_targets")


def _per_device(
    a, b, ids, logit_scale, logit_bias, *, obj, axes, ring, ring_size, chunk, precision, global_batch
):
    """[2, b] row losses (row 0: a's rows, row 1: b's) of the local rows against the global batch."""
    local = a.shape[0]
    row_index = jax.lax.axis_index(axes) * local + jnp.arange(local, dtype=jnp.int32)
    x = jnp.stack([a, b])
    if ring:
        pad = -(-local // chunk) * chunk - local
        # Padded columns carry global index -1, which masks them out of every sum: one tile
        # width, so one copy of the tile code in the program (a narrower last tile would be a
        # second, compiled forward and backward). The global index travels with its block:
        # columns know who they are in any lap step.
        visiting = (
            jnp.pad(x, ((0, 0), (0, pad), (0, 0))),
            jnp.pad(ids, (0, pad)),
            jnp.pad(row_index, (0, pad), constant_values=-1),
        )
        lap = functools.partial(_ring_lap, axes=axes, size=ring_size, chunk=chunk)
    else:
        visiting = (
            jax.lax.all_gather(x, axes, axis=1, tiled=True),
            jax.lax.all_gather(ids, axes, tiled=True),
            # arange(B), but not a constant: XLA would fold the top-k merge's b x B index
            # arrays at compile time, for seconds.
            jax.lax.all_gather(row_index, axes, tiled=True),
        )
        lap = lambda fold, init, blocks: fold(init, blocks)

    stats = {}
    if _needs_stats(obj):
        fold = functools.partial(_fold_stats, obj, sg(x), row_index, precision)
        stats = lap(fold, _init_stats(obj, local, axes), (sg(visiting[0]), *visiting[1:]))
        stats = _finish_stats(obj, stats)

    fold = functools.partial(
        _fold_tile, obj, x, row_index, ids, stats, (jnp.exp(logit_scale), logit_bias), precision
    )
    # Each tile recomputed in the backward pass: b x chunk logits, never all of a lap's.
    acc = lap(jax.checkpoint(fold) if ring else fold, _init_acc(obj, local, axes), visiting)
    return _row_losses(obj, acc, logit_scale, global_batch)


def objective_rows(
    obj: Objective,
    a,
    b,
    logit_scale,
    logit_bias=None,
    *,
    ids=None,
    mesh: Mesh,
    batch_axes: Sequence[str],
    impl: str = "gather",
    chunk: int | None = None,
    precision=jax.lax.Precision.HIGHEST,
):
    """[2, B] row losses (row 0: the anchors of `a`, row 1: those of `b`), sharded like the batch.

    a, b: [B, d] unit-norm embeddings sharded over batch_axes; ids: int [B] (needed by the
    multi-positive kinds); `impl` "gather" or "ring" (`chunk` columns per tile, default
    `blockwise.default_chunk`). For `sogclr` the rows are log g, not losses.
    """
    axes = tuple(batch_axes)
    ring_size = ring_size_of(mesh, axes)
    global_batch, dim = a.shape
    if global_batch % ring_size:
        raise ValueError(f"global batch {global_batch} does not split over {ring_size} devices")
    if impl not in ("gather", "ring"):
        raise ValueError(f"impl {impl!r}: expected 'gather' or 'ring'")
    if obj.uses_ids and ids is None:
        raise ValueError(f"objective {obj.name!r} needs ids")
    if obj.uses_bias and logit_bias is None:
        raise ValueError(f"objective {obj.name!r} needs a bias: set model.logit_bias_init (e.g. -10.0)")
    block = global_batch // ring_size
    chunk = min(chunk or default_chunk(block, dim), block)
    if ids is None:
        ids = jnp.zeros((global_batch,), jnp.int32)
    bias = jnp.asarray(0.0 if logit_bias is None else logit_bias, jnp.float32)
    body = functools.partial(
        _per_device,
        obj=obj,
        axes=axes,
        ring=impl == "ring",
        ring_size=ring_size,
        chunk=chunk,
        precision=precision,
        global_batch=global_batch,
    )
    rows = P(axes)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, rows, rows, P(), P()),
        out_specs=P(None, axes),
    )(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(logit_scale, jnp.float32),
        bias,
    )


def objective_mean(obj: Objective, a, b, logit_scale, logit_bias=None, **kwargs):
    """The objective's loss: the mean of its row losses over the 2B anchors."""
    if obj.name == "sogclr":
        raise ValueError("sogclr keeps state: use clipjax.losses.sogclr.sogclr_loss")
    return jnp.mean(objective_rows(obj, a, b, logit_scale, logit_bias, **kwargs))


def settings_objective(context) -> Objective:
    """The `Objective` a registry `LossContext` names, with the settings of its `config.loss`."""
    settings = {f.name: context.settings[f.name] for f in dataclasses.fields(Objective)[2:]}
    return Objective(context.name, intra=context.intra, **settings)


def mean_loss(context):
    """A registered objective's loss, computed here; the multi-positive kinds take their ids
    from `loss.positives`."""
    obj, c = settings_objective(context), context
    ids = (c.labels if c.settings["positives"] == "label" else c.ids) if obj.uses_ids else None
    return objective_mean(obj, c.a, c.b, c.logit_scale, c.logit_bias, ids=ids, **c.forms)


def _plain(gather, ring, *, bias=False):
    """A plain loss: its hand-written gather or ring form in image-text mode (less memory than
    autodiff through this module's ring), this module's form in image-image mode."""

    def loss(c):
        if c.intra:
            return mean_loss(c)
        if bias and c.logit_bias is None:
            raise ValueError(f"loss.name={c.name!r} needs a bias: set model.logit_bias_init (e.g. -10.0)")
        where = dict(mesh=c.mesh, batch_axes=c.batch_axes, precision=c.precision)
        scalars = (c.logit_scale, c.logit_bias) if bias else (c.logit_scale,)
        if c.impl == "ring":
            return ring(c.a, c.b, *scalars, chunk=c.chunk, **where)
        return gather(c.a, c.b, *scalars, **where)

    return loss


def _check_bias(config):
    if config.model.logit_bias_init is None:
        raise ConfigError("model.logit_bias_init: the sigmoid loss needs a bias (SigLIP uses -10.0)")


def _check_image_text(config):
    if config.task == "image_image":
        raise ConfigError("loss.name: 'alignment' is an image-text ablation (task='image_text')")


def _check_positives(config):
    if config.task == "image_image" and config.loss.positives == "text_id":
        raise ConfigError(
            "loss.positives: image-image views have no captions to share; 'label' (the oracle) "
            f"is what makes {config.loss.name!r} differ from plain NT-Xent"
        )


POSITIVES = {
    "positives": Field(
        "text_id",
        "multi_positive(_sigmoid): ids that make positives (`label`: the concept, an oracle for studies)",
        choices=("text_id", "label"),
    )
}
MULTI_POSITIVE = {
    **POSITIVES,
    "multi_positive_form": Field(
        "in",
        "`in`: -log of the positives' summed probability (never above InfoNCE); `out`: SupCon's mean",
        choices=MULTI_POSITIVE_FORMS,
    ),
}
FNC = {
    "fnc_mode": Field(
        "eliminate",
        "fnc: drop detected false negatives from the denominator, or attract them",
        choices=FNC_MODES,
    ),
    "fnc_top_k": Field(5, "fnc: a false negative is among the anchor's k most similar items", minimum=1),
    "fnc_threshold": Field(
        0.8,
        "fnc: ... whose cosine similarity with the anchor also reaches this",
        check=lambda v: None if math.isfinite(v) else "expected a finite number",
    ),
}
DCL = {
    "dcl_class_prior": Field(
        0.01,
        "dcl: tau+, the chance that a negative shares the anchor's class",
        minimum=0.0,
        check=lambda v: None if v < 1 else "must be below 1",
    )
}
SOFT_TARGETS = {
    "soft_target_weight": Field(
        0.2,
        "soft_targets: alpha, the target mass spread by intra-modal similarity",
        minimum=0.0,
        check=lambda v: None if v <= 1 else "must be at most 1",
    ),
    "soft_target_temperature": Field(
        0.1,
        "soft_targets: temperature of the intra-modal similarity softmax",
        check=lambda v: None if v > 0 else "must be positive",
    ),
}
BY_IDS = ("ids", "labels")

register_objective("softmax", _plain(global_infonce_loss, ring_infonce_loss))
register_objective(
    "sigmoid", _plain(global_sigmoid_loss, ring_sigmoid_loss, bias=True), checks=(_check_bias,)
)
register_objective("alignment", lambda c: alignment_only_loss(c.a, c.b), checks=(_check_image_text,))

register_objective(
    "multi_positive", mean_loss, fields=MULTI_POSITIVE, uses=BY_IDS, checks=(_check_positives,)
)
register_objective(
    "multi_positive_sigmoid", mean_loss, fields=POSITIVES, uses=BY_IDS, checks=(_check_bias, _check_positives)
)
register_objective("fnc", mean_loss, fields=FNC)
register_objective("dcl", mean_loss, fields=DCL)
register_objective("soft_targets", mean_loss, fields=SOFT_TARGETS)
