"""Embedding metrics: known spectra, brute-force geometry and collisions, sharded == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipjax.metrics import (
    CollapseAlarm,
    SPECTRUM_KEYS,
    collision_stats,
    covariance,
    dims_for_variance,
    embedding_metrics,
    expected_collision_count,
    expected_collision_rate,
    logit_stats,
    reference_embedding_metrics,
    spectrum_metrics,
    split_spectra,
)
from clipjax.metrics import embedding, geometry
from clipjax.metrics.plot import plot_spectrum_history

spectrum_of = jax.jit(lambda x: spectrum_metrics(*covariance(x)))


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _with_covariance(eigs, n, rng, offset=0.5):
    """[n, d] samples whose centered covariance is exactly R diag(eigs) R^T for a random rotation R."""
    d = len(eigs)
    z = rng.normal(size=(n, d))
    q = np.linalg.qr(z - z.mean(axis=0))[0]  # orthonormal, zero-mean columns
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (q * np.sqrt(n * np.asarray(eigs))) @ rotation.T + offset


def _pairs(seed, b=64, d=16):
    """Correlated unit-norm image/text pairs with a decaying spectrum and repeating keys."""
    rng = np.random.default_rng(seed)
    img = _unit(rng.normal(size=(b, d)) * np.arange(1, d + 1) ** -0.7 + 0.3)
    txt = _unit(img + 0.5 * rng.normal(size=(b, d)))
    keys = rng.integers(-1, 12, size=b)  # -1 = unknown, never collides
    return img.astype(np.float32), txt.astype(np.float32), keys.astype(np.int32)


# --- spectrum ---------------------------------------------------------------------------------


def test_rank_k_data_has_effective_rank_k():
    rng = np.random.default_rng(0)
    n, d, k = 2000, 32, 5
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    x = rng.normal(size=(n, k)) @ basis.T + 2.0  # isotropic within a 5-dim subspace, off-center
    m = spectrum_of(jnp.asarray(x, jnp.float32))
    assert abs(float(m["effective_rank_centered"]) - k) < 0.1 * k
    assert int(m["dims_99"]) == k
    assert np.all(np.diff(np.asarray(m["spectrum"])) <= 0) and np.all(np.asarray(m["spectrum"]) >= 0)


def test_rankme_equals_the_hand_computed_value_on_a_power_law_spectrum():
    """Singular values sigma_k = k^-1.5 of the embeddings themselves (RankMe as published).

    An implementation that used eigenvalues (sigma^2) in place of singular values, or that
    centered the data, would give another value (both are computed below and must differ)."""
    n, d = 256, 64
    rng = np.random.default_rng(7)
    sigma = np.arange(1, d + 1, dtype=np.float64) ** -1.5
    # The first left singular vector is constant: the largest component is the rows' common
    # offset, which the centered variant removes (so the two must differ).
    u = np.linalg.qr(np.column_stack([np.ones(n), rng.normal(size=(n, d - 1))]))[0]
    v = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = (u * sigma) @ v.T  # exactly these singular values
    p = sigma / sigma.sum()
    expected = float(np.exp(-np.sum(p * np.log(p))))
    got = spectrum_of(jnp.asarray(x, jnp.float32))
    assert float(got["effective_rank"]) == pytest.approx(expected, rel=2e-3)
    squared = sigma**2 / np.sum(sigma**2)
    assert abs(float(np.exp(-np.sum(squared * np.log(squared)))) - expected) > 0.3 * expected
    centered = np.linalg.svd(x - x.mean(0), compute_uv=False)
    q = centered / centered.sum()
    centered_rank = float(np.exp(-np.sum(q * np.log(q))))
    assert float(got["effective_rank_centered"]) == pytest.approx(centered_rank, rel=2e-3)
    assert abs(centered_rank - expected) > 1e-2 * expected


@pytest.mark.parametrize("a", [1.5, 2.0])
def test_power_law_alpha(a):
    rng = np.random.default_rng(1)
    n, d = 2000, 32
    eigs = np.arange(1, d + 1, dtype=np.float64) ** -a
    exact = spectrum_of(jnp.asarray(_with_covariance(eigs, n, rng), jnp.float32))
    np.testing.assert_allclose(np.asarray(exact["spectrum"]), eigs, rtol=1e-3, atol=1e-6)
    assert abs(float(exact["alpha"]) - a) < 0.05 * a
    # Gaussian samples from that covariance: the sample spectrum wobbles, the fit should not much.
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    sampled = spectrum_of(jnp.asarray((rng.normal(size=(n, d)) * np.sqrt(eigs)) @ rotation.T, jnp.float32))
    assert abs(float(sampled["alpha"]) - a) < 0.05 * a


def test_dims_99():
    eigs = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.015, 0.004, 0.001])  # cumulative .98 at 5, .995 at 6
    assert int(dims_for_variance(jnp.asarray(eigs, jnp.float32))) == 6
    m = spectrum_of(jnp.asarray(_with_covariance(eigs, 500, np.random.default_rng(2)), jnp.float32))
    assert int(m["dims_99"]) == 6
    rng = np.random.default_rng(3)
    for _ in range(5):
        e = np.sort(rng.exponential(size=24) ** 4)[::-1]
        expected = next(i + 1 for i, c in enumerate(np.cumsum(e) / e.sum()) if c >= 0.99)
        assert int(dims_for_variance(jnp.asarray(e, jnp.float32))) == expected


def test_collapsed_data_reads_as_collapsed():
    x = np.tile(_unit(np.ones((1, 16))), (32, 1)).astype(np.float32)
    m = jax.jit(reference_embedding_metrics)(x, x, None, 0.0)
    assert float(m["img_effective_rank"]) == pytest.approx(1.0, abs=1e-3)
    assert float(m["img_alpha"]) == 0.0 and float(m["img_uniformity"]) == pytest.approx(0.0, abs=1e-5)


# --- geometry and collisions against numpy ------------------------------------------------------


def test_geometry_matches_numpy():
    img, txt, _ = _pairs(4)
    x, y = img.astype(np.float64), txt.astype(np.float64)
    b = len(x)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    scale, bias = np.exp(2.0), -1.5

    np.testing.assert_allclose(geometry.alignment(img, txt), np.mean(np.sum((x - y) ** 2, axis=1)), rtol=1e-5)
    for z in (x, y):
        unif = np.log(np.mean([np.exp(-2 * np.sum((z[i] - z[j]) ** 2)) for i, j in pairs]))
        cos = np.mean([z[i] @ z[j] / np.linalg.norm(z[i]) / np.linalg.norm(z[j]) for i, j in pairs])
        np.testing.assert_allclose(geometry.uniformity(z.astype(np.float32)), unif, rtol=1e-5)
        np.testing.assert_allclose(
            geometry.mean_pairwise_cosine(z.astype(np.float32)), cos, rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        geometry.modality_gap(img, txt), np.linalg.norm(x.mean(0) - y.mean(0)), rtol=1e-5
    )

    logits = scale * x @ y.T + bias
    stats = logit_stats(img, txt, 2.0, bias)
    np.testing.assert_allclose(stats["logit_pos_mean"], np.mean(np.diag(logits)), rtol=1e-5)
    np.testing.assert_allclose(stats["logit_neg_mean"], np.mean([logits[i, j] for i, j in pairs]), rtol=1e-5)
    np.testing.assert_allclose(
        stats["logit_neg_max_mean"],
        np.mean([max(logits[i, j] for j in range(b) if j != i) for i in range(b)]),
        rtol=1e-5,
    )


def test_collisions_match_brute_force():
    img, txt, keys = _pairs(5)
    b, scale, bias = len(keys), np.exp(1.5), 0.7
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T + bias
    counts, masses = [], []
    for i in range(b):
        same = [j for j in range(b) if j != i and keys[i] >= 0 and keys[j] == keys[i]]
        p = np.exp(logits[i] - logits[i].max())
        p /= p.sum()
        counts.append(len(same))
        masses.append(sum(p[j] for j in same))
    assert 0 < np.mean(np.array(counts) > 0) < 1  # the fixture has both kinds of anchors
    got = collision_stats(img, txt, keys, 1.5, bias)
    np.testing.assert_allclose(got["collision_count_mean"], np.mean(counts), rtol=1e-6)
    np.testing.assert_allclose(got["collision_frac"], np.mean(np.array(counts) > 0), rtol=1e-6)
    np.testing.assert_allclose(got["collision_prob_mass"], np.mean(masses), rtol=1e-5)


def test_expected_collisions():
    assert expected_collision_rate(1, 10) == 0.0
    assert expected_collision_rate(2, 4) == pytest.approx(0.25)
    assert expected_collision_count(257, 64) == pytest.approx(4.0)
    rng = np.random.default_rng(6)
    keys = rng.integers(0, 50, size=(4000, 64))
    has_twin = (keys[:, 1:] == keys[:, :1]).any(axis=1)  # anchor 0 of each simulated batch
    assert np.mean(has_twin) == pytest.approx(expected_collision_rate(64, 50), abs=0.03)


# --- sharded == single device -------------------------------------------------------------------


@functools.cache
def _reference(with_extras):
    img, txt, keys = _pairs(7)
    args = (keys, 2.3, -1.0) if with_extras else (None, 2.3, None)
    return jax.tree.map(np.asarray, jax.jit(reference_embedding_metrics)(img, txt, *args))


@pytest.mark.parametrize(
    "shape,with_extras,tile",
    [((8, 1), True, None), ((2, 4), True, None), ((2, 4), False, None), ((8, 1), True, 3)],
)
def test_sharded_equals_single_device(shape, with_extras, tile, monkeypatch):
    if tile:  # tiles narrower than the block, the last one narrower still
        monkeypatch.setattr(embedding, "_tile_width", lambda block, dim: min(block, tile))
    mesh = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    axes = ("data", "fsdp")
    sharding = NamedSharding(mesh, P(axes))
    img, txt, keys = (jax.device_put(a, sharding) for a in _pairs(7))
    if with_extras:
        fn = lambda i, t, k: embedding_metrics(
            i, t, k, jnp.float32(2.3), jnp.float32(-1.0), mesh=mesh, batch_axes=axes
        )
        got = jax.jit(fn)(img, txt, keys)
    else:
        fn = lambda i, t: embedding_metrics(i, t, None, jnp.float32(2.3), None, mesh=mesh, batch_axes=axes)
        got = jax.jit(fn)(img, txt)
    want = _reference(with_extras)

    assert set(got) == set(want)
    assert ("collision_frac" in got) == with_extras
    eigen = {"img_effective_rank", "txt_effective_rank", "img_alpha", "txt_alpha"}
    for key, value in want.items():
        value_got = np.asarray(got[key])
        if key in SPECTRUM_KEYS:
            np.testing.assert_allclose(value_got, value, rtol=1e-4, atol=1e-5 * value.max(), err_msg=key)
        elif key in eigen:
            np.testing.assert_allclose(value_got, value, rtol=1e-4, err_msg=key)
        else:
            np.testing.assert_allclose(value_got, value, rtol=1e-5, atol=1e-6, err_msg=key)
    scalars, spectra = split_spectra(jax.device_get(got))
    assert set(spectra) == set(SPECTRUM_KEYS) and all(np.ndim(v) == 0 for v in scalars.values())


# --- collapse alarm -----------------------------------------------------------------------------


def _measurement(rank, uniformity=-2.5, d=64):
    return {
        "img_effective_rank": rank,
        "txt_effective_rank": rank,
        "img_uniformity": uniformity,
        "txt_uniformity": uniformity,
        "img_spectrum": np.ones(d),
        "txt_spectrum": np.ones(d),
    }


def test_alarm_fires_once_on_collapse():
    alarm = CollapseAlarm(modalities=("img",))
    ranks = [20, 22, 24, 25, 25, 26, 26, 12, 11, 5, 4, 1.2, 1.1, 1.1, 1.1]
    unifs = [-2.5] * 11 + [-0.01] * 4
    lines = {}
    for i, (rank, unif) in enumerate(zip(ranks, unifs)):
        lines[100 * i] = alarm.update(100 * i, _measurement(rank, unif))
    flat = [line for ls in lines.values() for line in ls]
    assert len(flat) == len(alarm.fired) == 4  # each condition once, no repeats on later steps
    assert alarm.fired == {
        "dimensional_drop:img": 800,
        "dimensional_rank:img": 1000,
        "complete_rank:img": 1200,
        "complete_uniformity:img": 1200,
    }
    assert alarm.dimensional and alarm.complete
    (drop,) = lines[800]
    assert drop.startswith("step 800:") and "img_effective_rank=11" in drop and "max_drop 50%" in drop
    (floor,) = lines[1000]
    assert "img_effective_rank=4 < 6.4" in floor
    assert any("img_uniformity=-0.01 > -0.05" in line for line in lines[1200])


def test_alarm_quiet_on_healthy_run():
    alarm = CollapseAlarm(batch_size=256)
    rng = np.random.default_rng(8)
    # Untrained towers start collapsed (rank ~1, uniformity ~0); warm-up keeps that from firing.
    history = [(1.1, -0.01), (1.3, -0.02), (2.0, -0.2)] + [
        (8 + 1.5 * i + rng.normal(), -2.0) for i in range(40)
    ]
    # One-measurement dip: patience keeps it from firing.
    history[30] = (history[30][0] * 0.4, -2.0)
    for i, (rank, unif) in enumerate(history):
        assert alarm.update(50 * i, _measurement(rank, unif)) == []
    assert alarm.fired == {} and not alarm.complete and not alarm.dimensional


def test_alarm_rank_floor_uses_batch_ceiling():
    alarm = CollapseAlarm(batch_size=33, warmup=0, patience=1, modalities=("txt",))  # ceiling 32, floor 3.2
    assert alarm.update(1, _measurement(4.0, d=512)) == []
    (line,) = alarm.update(2, _measurement(3.0, d=512))
    assert "txt_effective_rank=3 < 3.2" in line and "32 dims" in line


# --- plot ---------------------------------------------------------------------------------------


def test_plot_writes_png(tmp_path):
    d = 32
    records = [
        {
            "step": s,
            "img_spectrum": np.arange(1, d + 1) ** -(1 + s / 1000),
            "img_effective_rank": 10 + s / 100,
            "txt_spectrum": np.r_[np.arange(1, d) ** -1.5, 0.0],
            "txt_effective_rank": 8 + s / 200,
        }
        for s in range(0, 1000, 200)
    ]
    path = plot_spectrum_history(records, str(tmp_path / "plots" / "spectrum.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
