"""False-negative-aware objectives: sharded (gather and ring) equal a direct one-device computation.

The references below are written from the objectives' equations on the full candidate matrix
(B x B logits per direction in image-text mode, the 2B x 2B matrix of both views with its
diagonal masked in image-image mode), not from the library's code. Compiling is most of this
file's time, so each (mode, form, mesh) compiles every objective in one program, once, and the
tests read their cases from it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipjax.losses import init_loss_state, loss_section, objective_loss, objective_rows
from clipjax.losses.objectives import Objective
from tests.helpers import paired_unit_embeddings, rel_err

LOSS_SECTION = loss_section()

B, D = 64, 16
AXES = ("data", "fsdp")
# Neither a round number, so a gradient off by a factor cannot pass by accident.
LOGIT_SCALE, LOGIT_BIAS = 2.7, -3.3
NUM_EXAMPLES = 100  # sogclr's dataset: N_padded = 104 on 8 devices, 13 entries each
GAMMA = 0.7
HIGHEST = jax.lax.Precision.HIGHEST

# Each case: the `loss` fields it sets. `multi_positive_distinct` gets all-distinct ids, the others
# ids with many repeats (24 values over 64 rows) and 4 labels. fnc's threshold 0.5 leaves rows
# with 0, 1, 2 and 3 of their top 3 detected (42, 33, 31, 22 of the 128 anchors).
CASES = {
    "softmax": dict(name="softmax"),
    "sigmoid": dict(name="sigmoid"),
    "multi_positive": dict(name="multi_positive"),
    "multi_positive_out": dict(name="multi_positive", multi_positive_form="out"),
    "multi_positive_label": dict(name="multi_positive", positives="label"),
    "multi_positive_distinct": dict(name="multi_positive"),
    "multi_positive_sigmoid": dict(name="multi_positive_sigmoid"),
    "fnc_eliminate": dict(name="fnc", fnc_top_k=3, fnc_threshold=0.5),
    "fnc_attract": dict(name="fnc", fnc_mode="attract", fnc_top_k=3, fnc_threshold=0.5),
    "dcl": dict(name="dcl", dcl_class_prior=0.01),
    "dcl_unbiased": dict(name="dcl", dcl_class_prior=0.0),
    "soft_targets": dict(name="soft_targets", soft_target_weight=0.3, soft_target_temperature=0.2),
    "soft_targets_off": dict(name="soft_targets", soft_target_weight=0.0),
    "sogclr": dict(name="sogclr", sogclr_gamma=GAMMA),
}
# Cases that differ from another only in their data or settings, not in the code the ring runs:
# checked in the gather form only, so the ring's programs stay small to compile.
GATHER_ONLY = ("multi_positive_label", "multi_positive_distinct", "dcl_unbiased", "soft_targets_off")
# (mode, impl, mesh shape, chunk): every mesh in both modes and in both forms; the ring with
# tiles that do not divide the 8-column block (3, 5) and with the default (the whole block).
COMBOS = [
    ("image_text", "gather", (8, 1), None),
    ("image_text", "ring", (2, 4), 3),
    ("image_text", "ring", (1, 8), None),
    ("image_image", "gather", (1, 8), None),
    ("image_image", "gather", (2, 4), None),
    ("image_image", "ring", (8, 1), 5),
]


def _mesh(shape, devices=None):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _loss_config(**fields):
    config = LOSS_SECTION.to_config()
    config.update(fields)
    return config


def _batch(seed=0):
    """Embeddings, ids with many repeats, few labels, and dataset indices (numpy / jnp, one device)."""
    a, b = paired_unit_embeddings(seed, B, D)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 24, B).astype(np.int32)
    labels = rng.integers(0, 4, B).astype(np.int32)
    index = rng.permutation(NUM_EXAMPLES)[:B].astype(np.int32)
    return a, b, ids, labels, index


def _sogclr_start(index):
    """A state where half of the batch's examples were seen before, as a [2, N_padded] array."""
    rng = np.random.default_rng(7)
    log_u = np.full((2, 104), -np.inf, np.float32)
    seen = index[::2]
    log_u[:, seen] = rng.normal(1.0, 0.5, (2, seen.size)).astype(np.float32)
    return log_u


# ---------------------------------------------------------------- the references (one device)


def _candidates(a, b, logit_scale, bias, intra):
    """The 2B anchors' logits over their candidates, from the full matrices.

    Returns logits [2B, C] (anchors: a's rows, then b's), the candidate mask, each anchor's
    positive column, and the item (batch position) of each anchor and column.
    """
    scale = jnp.exp(logit_scale)
    if intra:
        z = jnp.concatenate([a, b])
        logits = scale * jnp.matmul(z, z.T, precision=HIGHEST) + bias
        candidates = ~np.eye(2 * B, dtype=bool)
        positive = (np.arange(2 * B) + B) % (2 * B)
        col_item = np.arange(2 * B) % B
    else:
        logits = scale * jnp.concatenate(
            [jnp.matmul(a, b.T, precision=HIGHEST), jnp.matmul(b, a.T, precision=HIGHEST)]
        )
        logits = logits + bias
        candidates = np.ones((2 * B, B), bool)
        positive = np.arange(2 * B) % B
        col_item = np.arange(B)
    return logits, candidates, positive, np.arange(2 * B) % B, col_item


def _lse(x, mask):
    return jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=1)


def _detected(a, b, top_k, threshold):
    """fnc's false negatives [2B anchors, B items]: top-k cross-side cosines (ties: lower index) >= threshold."""
    a, b = np.asarray(a), np.asarray(b)
    sims = np.concatenate([a @ b.T, b @ a.T])
    out = np.zeros((2 * B, B), bool)
    for r in range(2 * B):
        items = np.array([j for j in range(B) if j != r % B])
        order = items[np.lexsort((items, -sims[r, items]))][:top_k]
        out[r, order[sims[r, order] >= threshold]] = True
    return out


def _reference_rows(case, a, b, logit_scale, logit_bias, ids, labels, intra, found):
    """Row losses [2B] of a case (for sogclr: log g), straight from the equations.

    `found`: fnc's detections [2B, B] (`_detected`), computed beforehand (they take no gradient).
    """
    fields = {**LOSS_SECTION.read(None), **CASES[case]}
    name = fields["name"]
    sigmoid = name in ("sigmoid", "multi_positive_sigmoid")
    logits, cand, positive, row_item, col_item = _candidates(
        a, b, logit_scale, logit_bias if sigmoid else 0.0, intra
    )
    rows = np.arange(2 * B)
    onehot = np.zeros(cand.shape, bool)
    onehot[rows, positive] = True
    l_pos = logits[rows, positive]
    lse = _lse(logits, cand)
    key = labels if fields["positives"] == "label" else ids
    if case == "multi_positive_distinct":
        key = np.arange(B)
    same_key = cand & (key[col_item][None, :] == key[row_item][:, None])
    n_neg = cand.sum(1) - 1
    if name == "softmax":
        return lse - l_pos
    if name in ("sigmoid", "multi_positive_sigmoid"):
        z_pos = onehot if name == "sigmoid" else same_key
        return jnp.sum(jnp.where(cand, jax.nn.softplus(-jnp.where(z_pos, logits, -logits)), 0.0), axis=1)
    if name == "multi_positive":
        if fields["multi_positive_form"] == "in":
            return lse - _lse(logits, same_key)
        return lse - jnp.sum(jnp.where(same_key, logits, 0.0), axis=1) / same_key.sum(1)
    if name == "fnc":
        found = cand & found[:, col_item]
        if fields["fnc_mode"] == "eliminate":
            return _lse(logits, cand & ~found) - l_pos
        return lse - _lse(logits, onehot | found)
    if name == "dcl":
        tau = fields["dcl_class_prior"]
        pos = jnp.exp(l_pos)
        neg = jnp.sum(jnp.where(cand & ~onehot, jnp.exp(logits), 0.0), axis=1)
        ng = jnp.maximum((neg - n_neg * tau * pos) / (1 - tau), n_neg * jnp.exp(-jnp.exp(logit_scale)))
        return -jnp.log(pos / (pos + ng))
    if name == "soft_targets":
        alpha, temp = fields["soft_target_weight"], fields["soft_target_temperature"]
        # cos(a_i, a_j) for a's anchors, cos(b_i, b_j) for b's
        same_side = jnp.concatenate(
            [jnp.matmul(a, a.T, precision=HIGHEST), jnp.matmul(b, b.T, precision=HIGHEST)]
        )
        soft = jax.nn.softmax(jax.lax.stop_gradient(same_side) / temp, axis=1)
        # The soft mass of item j lands on the anchor's candidate holding j's cross-side view.
        cross_col = (
            np.where(rows[:, None] < B, B, 0) + np.arange(B)[None, :]
            if intra
            else np.tile(np.arange(B), (2 * B, 1))
        )
        targets = jnp.zeros(cand.shape).at[rows[:, None], cross_col].set(alpha * soft)
        targets = targets + (1 - alpha) * onehot
        return lse - jnp.sum(targets * logits, axis=1)
    if name == "sogclr":
        return _lse(logits - l_pos[:, None], cand & ~onehot) - jnp.log(n_neg)
    raise AssertionError(case)


def _reference_loss(case, a, b, logit_scale, logit_bias, ids, labels, index, log_u, intra, found):
    """(loss, new rows of log u or None); sogclr's value and gradient as its docstring defines."""
    rows = _reference_rows(case, a, b, logit_scale, logit_bias, ids, labels, intra, found)
    if CASES[case]["name"] != "sogclr":
        return jnp.mean(rows), None
    log_g = jax.lax.stop_gradient(rows)
    old = jnp.asarray(log_u[:, index].reshape(-1))
    g, u_old = jnp.exp(log_g), jnp.exp(old)
    u_new = jnp.where(jnp.isfinite(old), (1 - GAMMA) * u_old + GAMMA * g, g)
    value = jnp.mean(jnp.log1p((2 * B - 2 if intra else B - 1) * u_new))
    surrogate = jnp.mean(jnp.exp(rows) / u_new)
    return value + surrogate - jax.lax.stop_gradient(surrogate), jnp.log(u_new)


@functools.cache
def _reference(mode):
    """{case: (loss, grads, new log u rows)} on one device, every case in one program."""
    intra = mode == "image_image"
    a, b, ids, labels, index = _batch()
    log_u = _sogclr_start(index)
    cases = {}
    for case, fields in CASES.items():
        fields = {**LOSS_SECTION.read(None), **fields}
        case_ids = np.arange(B, dtype=np.int32) if case == "multi_positive_distinct" else ids
        found = _detected(a, b, fields["fnc_top_k"], fields["fnc_threshold"])
        cases[case] = functools.partial(
            _reference_loss,
            case,
            ids=case_ids,
            labels=labels,
            index=index,
            log_u=log_u,
            intra=intra,
            found=found,
        )

    def all_cases(a, b, s, bias):
        return {
            case: jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True)(a, b, s, bias)
            for case, f in cases.items()
        }

    with jax.default_device(jax.devices()[0]):
        out = jax.jit(all_cases)(a, b, jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))
    return {
        case: jax.tree.map(np.asarray, (loss, grads, new_u)) for case, ((loss, new_u), grads) in out.items()
    }


# ---------------------------------------------------------------- the library, sharded


@functools.cache
def _sharded(mode, impl, shape, chunk):
    """{case: (loss, grads, new log u rows)} from `objective_loss` on an 8-device mesh, one program."""
    intra = mode == "image_image"
    mesh = _mesh(shape)
    rows = NamedSharding(mesh, P(AXES))
    a, b, ids, labels, index = _batch()
    put = lambda x: jax.device_put(x, rows)
    distinct = np.arange(B, dtype=np.int32)
    state = {"log_u": jax.device_put(_sogclr_start(index), NamedSharding(mesh, P(None, AXES)))}
    configs = {
        case: _loss_config(impl=impl, chunk=chunk or 0, **fields)
        for case, fields in CASES.items()
        if impl == "gather" or case not in GATHER_ONLY
    }

    def all_cases(a, b, s, bias, ids, distinct, labels, index, state):
        out = {}
        for case, config in configs.items():

            def f(a, b, s, bias):
                return objective_loss(
                    config,
                    a,
                    b,
                    s,
                    bias,
                    ids=distinct if case == "multi_positive_distinct" else ids,
                    labels=labels,
                    index=index,
                    loss_state=state if case == "sogclr" else {},
                    mesh=mesh,
                    batch_axes=AXES,
                    intra=intra,
                )

            (loss, new_state), grads = jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True)(a, b, s, bias)
            new_u = new_state["log_u"][:, index].reshape(-1) if case == "sogclr" else None
            out[case] = (loss, grads, new_u)
        return out

    args = (put(a), put(b), jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))
    out = jax.jit(all_cases)(*args, put(ids), put(distinct), put(labels), put(index), state)
    # Each device gets its own rows' gradients back: the embeddings' gradients are sharded as they are.
    for case, (_, grads, _) in out.items():
        assert grads[0].sharding.is_equivalent_to(rows, 2) and grads[1].sharding.is_equivalent_to(rows, 2), (
            case
        )
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize(
    "combo,case",
    [(c, case) for c in COMBOS for case in CASES if c[1] == "gather" or case not in GATHER_ONLY],
    ids=lambda x: x if isinstance(x, str) else f"{x[0]}-{x[1]}-{x[2][0]}x{x[2][1]}-chunk{x[3]}",
)
def test_sharded_objective_equals_one_device_reference(combo, case):
    mode = combo[0]
    loss, grads, new_u = _sharded(*combo)[case]
    ref_loss, ref_grads, ref_u = _reference(mode)[case]
    assert rel_err(loss, ref_loss) <= 1e-5, (loss, ref_loss)
    for name, g, g_ref in zip(("a", "b", "logit_scale", "logit_bias"), grads, ref_grads):
        if not np.any(g_ref):
            assert not np.any(g), name  # the bias enters the sigmoid kinds only
            continue
        assert rel_err(g, g_ref) <= 1e-5, name
    if new_u is not None:
        assert rel_err(new_u, ref_u) <= 1e-5


@pytest.mark.parametrize("mode", ["image_text", "image_image"])
def test_special_cases_reduce_to_plain_infonce(mode):
    # Distinct ids: a single positive per row. tau+ = 0: the debiased sum is the plain sum (the
    # clamp N e^(-1/t) never binds, as every exp(logit) is at least e^(-1/t)). alpha = 0.
    combo = next(c for c in COMBOS if c[0] == mode and c[1] == "gather")
    plain = _reference(mode)["softmax"][0]
    for case in ("multi_positive_distinct", "dcl_unbiased", "soft_targets_off"):
        assert rel_err(_sharded(*combo)[case][0], plain) <= 1e-5, case
    # ... and with repeated ids the multi-positive loss is not the plain one.
    assert rel_err(_sharded(*combo)["multi_positive"][0], plain) > 1e-2


def test_image_text_softmax_is_clip_infonce():
    # Delegated to the existing loss: the reference's text mode is CLIP's symmetric InfoNCE.
    from clipjax.losses import reference_infonce_loss

    a, b, *_ = _batch()
    expected = reference_infonce_loss(a, b, LOGIT_SCALE)
    assert rel_err(_reference("image_text")["softmax"][0], expected) <= 1e-6
    assert rel_err(_sharded(*COMBOS[0])["softmax"][0], expected) <= 1e-5


def test_nt_xent_on_eight_devices_equals_one_device_and_the_textbook():
    a, b, ids, labels, index = _batch()
    # Textbook NT-Xent (SimCLR): 2B x 2B cosine matrix of both views, the diagonal masked out,
    # cross entropy of each view against its partner, averaged over the 2B views.
    z = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    sim = np.exp(LOGIT_SCALE) * z @ z.T
    np.fill_diagonal(sim, -np.inf)
    partner = (np.arange(2 * B) + B) % (2 * B)
    m = sim.max(1, keepdims=True)
    textbook = np.mean(m[:, 0] + np.log(np.exp(sim - m).sum(1)) - sim[np.arange(2 * B), partner])

    mesh1 = _mesh((1, 1), devices=jax.devices()[:1])
    config = _loss_config(name="softmax", impl="gather")
    one_device = lambda a, b: objective_loss(
        config,
        a,
        b,
        LOGIT_SCALE,
        None,
        ids=ids,
        labels=labels,
        index=index,
        loss_state={},
        mesh=mesh1,
        batch_axes=AXES,
        intra=True,
    )[0]
    one = jax.jit(one_device)(a, b)
    for combo in COMBOS:
        if combo[0] == "image_image":
            eight = _sharded(*combo)["softmax"][0]
            assert rel_err(eight, one) <= 1e-5
    assert rel_err(one, textbook) <= 1e-5


@pytest.mark.parametrize("form", ["in", "out"])
def test_oracle_multi_positive_never_above_infonce(form):
    """-log sum_P softmax <= -log softmax(positive) as P holds the positive: the "in" form never
    exceeds InfoNCE, row by row. SupCon's "out" form (mean of the log-probabilities) does
    whenever a same-label candidate is less similar than the positive: this test fails for it,
    which is why "in" is multi_positive's default."""
    mesh = _mesh((8, 1))
    rows = NamedSharding(mesh, P(AXES))
    oracle = Objective("multi_positive", multi_positive_form=form)

    @jax.jit
    def excess(a, b, labels):
        common = dict(mesh=mesh, batch_axes=AXES, impl="gather")
        plain = objective_rows(Objective("softmax"), a, b, 4.0, **common)
        return objective_rows(oracle, a, b, 4.0, ids=labels, **common) - plain, plain

    worst = -np.inf
    for seed in range(6):
        a, b = paired_unit_embeddings(100 + seed, B, D)
        labels = np.random.default_rng(seed).integers(0, 3, B).astype(np.int32)  # ~21 per label
        diff, plain = (np.asarray(x) for x in excess(*(jax.device_put(x, rows) for x in (a, b, labels))))
        assert np.all(np.isfinite(diff))
        worst = max(worst, float(np.max(diff / (1.0 + plain))))
    if form == "in":
        assert worst <= 1e-6
    else:
        assert worst > 0.1  # the "out" form breaks the inequality by a wide margin


# ---------------------------------------------------------------- fnc on a planted batch


def _planted():
    """a_3 = e_0; b_7 = b_9 exact duplicates at cosine 0.95 from a_3 (a tie, broken to 7), the
    positive b_3 at 0.9; every other cosine with a_3 is its first coordinate, at most 0.7.

    The tied items' own-side views differ (a_9 close to a_3, a_7 far), so in image-image mode,
    where a detected item's two views leave together, the loss shows which one was taken.
    """
    a, b = (np.array(x) for x in paired_unit_embeddings(5, B, D))
    e0 = np.eye(D, dtype=np.float32)[0]

    def with_first(v, first):
        rest = v[1:] / np.linalg.norm(v[1:]) * np.sqrt(1 - first**2)
        return np.concatenate([[first], rest]).astype(np.float32)

    for x in (a, b):
        for j in range(B):
            x[j] = with_first(x[j], np.clip(x[j, 0], -0.7, 0.7))
    a[3] = e0
    b[3] = with_first(b[3], 0.9)
    b[7] = with_first(b[7], 0.95)
    b[9] = b[7]
    a[7] = with_first(a[7], -0.7)
    a[9] = with_first(a[9], 0.7)
    return a, b


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_fnc_eliminates_or_attracts_a_planted_near_duplicate(impl):
    a, b = _planted()
    mesh = _mesh((2, 4))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(AXES)))
    common = dict(mesh=mesh, batch_axes=AXES, impl=impl, chunk=3)
    fnc = lambda **kw: Objective("fnc", fnc_top_k=1, fnc_threshold=0.92, **kw)
    objectives = {
        "plain": Objective("softmax"),
        "eliminate": fnc(),
        "attract": fnc(fnc_mode="attract"),
        "never": Objective("fnc", fnc_top_k=5, fnc_threshold=1.5),
        "never_attract": Objective("fnc", fnc_mode="attract", fnc_top_k=5, fnc_threshold=1.5),
        "plain_views": Objective("softmax", intra=True),
        "eliminate_views": fnc(intra=True),
        "never_views": Objective("fnc", intra=True, fnc_top_k=5, fnc_threshold=1.5),
    }
    rows = jax.jit(
        lambda a, b: {k: objective_rows(o, a, b, LOGIT_SCALE, **common) for k, o in objectives.items()}
    )
    out = jax.tree.map(np.asarray, rows(put(a), put(b)))

    logits = np.exp(LOGIT_SCALE) * a.astype(np.float64) @ b.T.astype(np.float64)
    lse = lambda x: x.max() + np.log(np.sum(np.exp(x - x.max())))
    row = logits[3]
    # Of the tied duplicates 7 and 9 only 7, the lower index, is among the top 1.
    without_7 = lse(np.delete(row, 7)) - row[3]
    assert abs(out["eliminate"][0, 3] - without_7) <= 1e-5 * abs(without_7)
    assert abs(out["attract"][0, 3] - (lse(row) - lse(row[[3, 7]]))) <= 1e-5
    assert out["eliminate"][0, 3] < out["plain"][0, 3] - 0.1
    assert out["attract"][0, 3] < out["eliminate"][0, 3]
    # Rows that detect nothing (cosines < 0.92) are plain InfoNCE rows.
    quiet = [r for r in range(B) if r != 3 and max(np.delete(a[r] @ b.T, r)) < 0.92]
    assert len(quiet) > B // 2
    np.testing.assert_allclose(out["eliminate"][0, quiet], out["plain"][0, quiet], rtol=1e-6)
    # Image-image mode: both views of item 7 leave a_3's candidates.
    z = np.concatenate([a, b]).astype(np.float64)
    views = np.exp(LOGIT_SCALE) * z[3] @ z.T
    keep = np.ones(2 * B, bool)
    keep[[3, 7, B + 7]] = False
    expected = lse(views[keep]) - views[B + 3]
    assert abs(out["eliminate_views"][0, 3] - expected) <= 1e-5 * abs(expected)
    # A threshold above 1 detects nothing: fnc is the plain loss, row by row.
    np.testing.assert_allclose(out["never"], out["plain"], rtol=1e-6)
    np.testing.assert_allclose(out["never_attract"], out["plain"], rtol=1e-6)
    np.testing.assert_allclose(out["never_views"], out["plain_views"], rtol=1e-6)


def test_dcl_reference_exercises_both_branches_of_the_clamp():
    # Otherwise the dcl cases above would test only one side of the max.
    a, b, *_ = _batch()
    logits, cand, positive, *_ = _candidates(a, b, LOGIT_SCALE, 0.0, False)
    logits = np.asarray(logits, np.float64)
    pos = np.exp(logits[np.arange(2 * B), positive])
    neg = np.exp(logits).sum(1) - pos
    debiased = (neg - (B - 1) * 0.01 * pos) / 0.99
    floor = (B - 1) * np.exp(-np.exp(LOGIT_SCALE))
    assert np.any(debiased < floor) and np.any(debiased > floor)


def test_stable_at_the_temperature_cap():
    """exp(logit_scale) = 100: raw exponentials of the logits overflow float32 (e^100 > 3.4e38).
    dcl and sogclr, which work with e^l rather than log-sum-exps, match float64 numpy."""
    a, b, *_ = _batch(3)
    mesh = _mesh((8, 1))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(AXES)))
    cap = float(np.log(100.0))
    objectives = [Objective(name, intra=intra) for name in ("dcl", "sogclr") for intra in (False, True)]

    @jax.jit
    def rows_and_grads(a, b):
        common = dict(mesh=mesh, batch_axes=AXES, impl="ring", chunk=3)
        rows = [objective_rows(o, a, b, cap, **common) for o in objectives]
        grads = jax.grad(
            lambda a, b, s: jnp.mean(objective_rows(objectives[1], a, b, s, **common)), (0, 1, 2)
        )
        return rows, grads(a, b, cap)

    rows, grads = rows_and_grads(put(a), put(b))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    x64 = [np.asarray(v, np.float64) for v in (a, b)]
    for obj, got in zip(objectives, rows):
        logits = np.concatenate([x64[0] @ x64[1].T, x64[1] @ x64[0].T]) * 100.0
        if obj.intra:
            z = np.concatenate(x64)
            logits = 100.0 * z @ z.T
            np.fill_diagonal(logits, -np.inf)
        positive = (np.arange(2 * B) + B) % (2 * B) if obj.intra else np.arange(2 * B) % B
        l_pos = logits[np.arange(2 * B), positive]
        shifted = logits - l_pos[:, None]
        shifted[np.arange(2 * B), positive] = -np.inf
        n = obj.negatives(B)
        ratio = np.exp(shifted).sum(1)  # sum_n e^(l_n - l_p), finite in float64
        if obj.name == "sogclr":
            expected = np.log(ratio / n)
        else:
            floor = n * np.exp(-100.0 - l_pos)
            expected = np.log1p(np.maximum((ratio - n * 0.01) / 0.99, floor))
        # atol: logits near 100 carry float32 rounding of about 1e-5 in absolute terms, and
        # dcl's rows are near 0 at this temperature.
        np.testing.assert_allclose(np.asarray(got).reshape(-1), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sogclr state


def _numpy_log_g(a, b, intra):
    """log g of each anchor [2, B] (a's, then b's), in float64 from the embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = np.exp(LOGIT_SCALE)
    out = np.zeros((2, B))
    for side, (x, y) in enumerate([(a, b), (b, a)]):
        for i in range(B):
            negatives = [s * x[i] @ y[j] for j in range(B) if j != i]
            if intra:
                negatives += [s * x[i] @ x[j] for j in range(B) if j != i]
            negatives = np.array(negatives) - s * x[i] @ y[i]
            out[side, i] = np.log(np.mean(np.exp(negatives)))
    return out


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_sogclr_state_moving_average_sharding_and_checkpoint(impl, tmp_path):
    from clipjax.checkpoint import Checkpointer

    mesh = _mesh((2, 4))
    rows = NamedSharding(mesh, P(AXES))
    config = _loss_config(name="sogclr", impl=impl, sogclr_gamma=GAMMA)
    state = init_loss_state(config, NUM_EXAMPLES, mesh, AXES)
    log_u = state["log_u"]
    # Created sharded: [2, 104], the second axis split 8 ways, never whole on a device.
    assert log_u.shape == (2, 104) and log_u.dtype == jnp.float32
    assert log_u.sharding.spec == P(None, AXES)
    assert {s.data.shape for s in log_u.addressable_shards} == {(2, 13)}
    assert np.all(np.isneginf(np.asarray(log_u)))

    @jax.jit
    def step(a, b, ids, index, state):
        return objective_loss(
            config,
            a,
            b,
            LOGIT_SCALE,
            None,
            ids=ids,
            labels=ids,
            index=index,
            loss_state=state,
            mesh=mesh,
            batch_axes=AXES,
        )

    first = np.arange(B, dtype=np.int32)
    second = (np.arange(B, dtype=np.int32) + 40) % NUM_EXAMPLES  # 24 seen in step 1, 40 new
    expected = np.full((2, 104), -np.inf)
    for seed, index in enumerate((first, second)):
        a, b = paired_unit_embeddings(20 + seed, B, D)
        put = lambda x: jax.device_put(x, rows)
        loss, state = step(put(a), put(b), put(index), put(index), state)
        g = np.exp(_numpy_log_g(a, b, False))
        old = expected[:, index]
        expected[:, index] = np.log(np.where(np.isfinite(old), (1 - GAMMA) * np.exp(old) + GAMMA * g, g))
        if seed == 0:
            # First visit: u = g, and the value is the plain InfoNCE loss.
            plain = np.mean(np.log1p((B - 1) * g))
            assert abs(float(loss) - plain) <= 1e-5 * plain
    got = np.asarray(state["log_u"])
    np.testing.assert_allclose(
        got[np.isfinite(expected)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-5
    )
    assert np.all(np.isneginf(got[~np.isfinite(expected)]))  # never visited: still unset
    assert state["log_u"].sharding.spec == P(None, AXES)
    assert {s.data.shape for s in state["log_u"].addressable_shards} == {(2, 13)}

    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, {"loss_state": state})
    checkpointer.wait()
    # Restored into the shardings of a freshly created state, as the trainer restores it.
    shardings = jax.tree.map(lambda x: x.sharding, init_loss_state(config, NUM_EXAMPLES, mesh, AXES))
    abstract = {
        "loss_state": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
    }
    restored, _ = checkpointer.restore(1, abstract, with_data=False)
    restored = restored["loss_state"]["log_u"]
    np.testing.assert_array_equal(np.asarray(restored), got)
    assert restored.sharding.is_equivalent_to(state["log_u"].sharding, 2)


# ---------------------------------------------------------------- memory


def test_ring_holds_no_batch_by_batch_logits():
    """At B = 8,192 on 8 devices the gather form holds 1,024 x 16,384 logits (64 MiB each); the
    ring only tiles of them and its visiting blocks (compiled only, nothing runs)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rows, scalar = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((8192, 32), jnp.float32, sharding=rows)
    s = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
    temp = {}
    for impl in ("gather", "ring"):
        obj = Objective("fnc", intra=True)
        loss = lambda a, b, s: jnp.mean(
            objective_rows(obj, a, b, s, mesh=mesh, batch_axes=("data",), impl=impl)
        )
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(emb, emb, s).compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 1024 * 16384 * 4
    assert temp["gather"] > 2 * logits_bytes
    assert temp["ring"] < logits_bytes / 4
    assert temp["ring"] * 10 < temp["gather"]


def test_config_fields_are_checked():
    loss = LOSS_SECTION.read(ml_collections.ConfigDict({"name": "fnc"}), "loss")
    assert loss["fnc_top_k"] == 5 and loss["fnc_mode"] == "eliminate" and loss["multi_positive_form"] == "in"
    from clipjax.schema import ConfigError

    for bad in (
        {"dcl_class_prior": 1.0},
        {"sogclr_gamma": 0.0},
        {"soft_target_temperature": 0.0},
        {"fnc_top_k": 0},
    ):
        with pytest.raises(ConfigError):
            LOSS_SECTION.read(bad, "loss")
    # Objective's defaults (for direct use) are the schema's.
    for field in dataclasses.fields(Objective):
        if field.name in loss and field.name != "name":
            assert field.default == loss[field.name], field.name
    # The plain image-text losses keep their old behaviour and no state.
    assert init_loss_state(_loss_config(name="softmax"), NUM_EXAMPLES, _mesh((8, 1)), AXES) == {}
