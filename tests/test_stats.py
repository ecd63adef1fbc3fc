"""Chan merge, pool_rows, ema_rows, RowBuffer and SpreadTracker against float64 numpy."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from bnfix.drift import drifts
from bnfix.stats import (
    Moments,
    RowBuffer,
    SpreadTracker,
    ema_rows,
    moments_of,
    pool_layers,
    pool_rows,
)


def np_moments(a: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, M2) per channel of a (C, n) array, two-pass in float64."""
    mean = a.mean(axis=1)
    return a.shape[1], mean, ((a - mean[:, None]) ** 2).sum(axis=1)


def direct(a: np.ndarray) -> Moments:
    """Moments of a (C, n) array computed here, not by bnfix (bnfix only merges them)."""
    if a.shape[1] == 0:
        return Moments.empty(a.shape[0])
    n, mean, m2 = np_moments(a)
    return Moments(n, torch.from_numpy(mean), torch.from_numpy(m2))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("loc", [0.0, 3.0, 1e4, -1e6])
def test_chan_merge_matches_numpy_on_random_splits(seed: int, loc: float) -> None:
    rng = np.random.default_rng(seed)
    channels = 4
    data = rng.normal(loc, 1.0 + rng.random((channels, 1)), size=(channels, 500))
    cuts = np.sort(rng.integers(0, 501, size=6))  # repeated cuts give n=0 parts
    parts = np.split(data, cuts, axis=1)
    parts.insert(len(parts) // 2, data[:, :0])  # always at least one n=0 part
    parts.insert(0, data[:, :0])
    merged = functools.reduce(Moments.merge, [direct(p) for p in parts], Moments.empty(channels))
    n, mean, m2 = np_moments(data)
    assert merged.n == n
    np.testing.assert_allclose(merged.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.m2.numpy(), m2, rtol=1e-9)
    np.testing.assert_allclose(merged.var().numpy(), data.var(axis=1, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(merged.var(0).numpy(), data.var(axis=1), rtol=1e-9)


def test_merge_with_empty_parts_is_identity() -> None:
    rng = np.random.default_rng(0)
    a = direct(rng.normal(size=(3, 10)))
    empty = Moments.empty(3)
    for merged in (a.merge(empty), empty.merge(a)):
        assert merged.n == 10
        assert torch.equal(merged.mean, a.mean) and torch.equal(merged.m2, a.m2)
    both = empty.merge(Moments.empty(3))
    assert both.n == 0
    with pytest.raises(ValueError, match="more than 1 element"):
        both.var()


def test_merge_single_points_and_large_mean_no_cancellation() -> None:
    # one point at a time (the worst split) around 1e8: E[x^2]-E[x]^2 would lose everything
    rng = np.random.default_rng(1)
    data = 1e8 + rng.normal(size=(2, 1000))
    points = [Moments(1, torch.from_numpy(data[:, i].copy()), torch.zeros(2)) for i in range(1000)]
    merged = functools.reduce(Moments.merge, points)
    np.testing.assert_allclose(merged.var().numpy(), data.var(axis=1, ddof=1), rtol=1e-6)


def test_var_needs_two_elements() -> None:
    one = Moments(1, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 element"):
        one.var()
    assert torch.equal(one.var(0), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(7, 3), (5, 3, 11), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_moments_of_matches_numpy(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 5
    m = moments_of(x)
    a = np.moveaxis(x.double().numpy(), 1, 0).reshape(3, -1)
    n, mean, m2 = np_moments(a)
    assert m.n == n and m.mean.dtype == torch.float64
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-10)


def test_moments_of_other_channel_dim_and_bad_input() -> None:
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    m = moments_of(x, channel_dim=2)
    a = x.double().numpy().reshape(-1, 3).T
    np.testing.assert_allclose(m.mean.numpy(), a.mean(axis=1), rtol=1e-12)
    empty = moments_of(torch.zeros(0, 3))
    assert empty.n == 0 and empty.mean.shape == (3,)
    with pytest.raises(ValueError, match="channel dimension"):
        moments_of(torch.zeros(5))


@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_pool_rows_matches_numpy_over_uneven_groups(loc: float) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(loc, 2.0, size=(3, 300))
    parts = np.split(data, [2, 5, 40, 41 + 2, 200], axis=1)
    ns = [p.shape[1] for p in parts]
    means = torch.tensor(np.stack([p.mean(1) for p in parts]))
    variances = torch.tensor(np.stack([p.var(1, ddof=1) for p in parts]))
    pooled = pool_rows(ns, means, variances)
    n, mean, m2 = np_moments(data)
    assert pooled.n == n
    np.testing.assert_allclose(pooled.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(pooled.m2.numpy(), m2, rtol=1e-9)
    with pytest.raises(ValueError, match="at least one row"):
        pool_rows([], means[:0], variances[:0])


@pytest.mark.parametrize("loc", [0.0, 1e4, -1e6])
def test_pool_rows_of_equal_groups_matches_numpy(loc: float) -> None:
    """Equal groups take the host-scalar path (one var_mean of the group means)."""
    rng = np.random.default_rng(5)
    data = rng.normal(loc, 2.0, size=(3, 240))
    parts = np.split(data, 8, axis=1)
    means = torch.tensor(np.stack([p.mean(1) for p in parts]))
    variances = torch.tensor(np.stack([p.var(1, ddof=1) for p in parts]))
    pooled = pool_rows([30] * 8, means, variances)
    n, mean, m2 = np_moments(data)
    assert pooled.n == n
    np.testing.assert_allclose(pooled.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(pooled.m2.numpy(), m2, rtol=1e-9)
    one = pool_rows([30], means[:1], variances[:1])
    np.testing.assert_allclose(one.m2.numpy(), 29 * variances[0].numpy(), rtol=1e-12)


def test_ema_rows_is_the_pytorch_update_repeated() -> None:
    old_mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    old_var = torch.tensor([0.5, 3.0], dtype=torch.float64)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(2, 20)) for _ in range(7)]
    expect_mean, expect_var = old_mean.numpy().copy(), old_var.numpy().copy()
    for x in batches:  # (1 - m) * old + m * batch, with the unbiased batch variance
        expect_mean = 0.75 * expect_mean + 0.25 * x.mean(1)
        expect_var = 0.75 * expect_var + 0.25 * x.var(1, ddof=1)
    means = torch.tensor(np.stack([x.mean(1) for x in batches]))
    variances = torch.tensor(np.stack([x.var(1, ddof=1) for x in batches]))
    mean, var = ema_rows(old_mean, old_var, means, variances, 0.25)
    np.testing.assert_allclose(mean.numpy(), expect_mean, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), expect_var, rtol=1e-12)


def test_row_buffer_rollback_commit_grow_and_take() -> None:
    rows = RowBuffer(2, torch.device("cpu"), capacity=2)
    one = torch.ones(2)
    rows.push(3, one, one)
    rows.commit(0)
    rows.push(4, 2 * one, one)
    rows.rollback()  # a skipped batch leaves nothing behind
    for _ in range(3):  # one forward calling the layer more often than the capacity
        rows.push(5, 3 * one, one)
    rows.commit(1)
    assert rows.full
    ns, means, _, tags = rows.take()
    assert ns == [3, 5, 5, 5]
    assert tags == [0, 1, 1, 1]
    assert means[:, 0].tolist() == [1.0, 3.0, 3.0, 3.0]
    assert not rows.full and rows.take()[0] == []


def test_spread_tracker_exact_on_synthetic_batches() -> None:
    rng = np.random.default_rng(4)
    k, b, channels = 40, 50, 3
    sigma = np.array([1.0, 2.0, 0.5])
    batches = [rng.normal(5.0, sigma[:, None], size=(channels, b)) for _ in range(k)]
    tracker = SpreadTracker()
    assert tracker.relative_standard_error(Moments.empty(channels), 1e-5) == math.inf
    total = Moments.empty(channels)
    for i, batch in enumerate(batches):
        m = direct(batch)
        tracker.add_rows(m.mean[None], m.var()[None])
        total = total.merge(m)
        if i == 0:
            assert tracker.relative_standard_error(total, 1e-5) == math.inf
    assert tracker.k == k
    eps = 1e-5
    data = np.concatenate(batches, axis=1)
    pooled_var = data.var(axis=1, ddof=1)
    means = np.array([b_.mean(axis=1) for b_ in batches])
    variances = np.array([b_.var(axis=1, ddof=1) for b_ in batches])
    rel_mean = means.std(axis=0, ddof=1) / math.sqrt(k) / np.sqrt(pooled_var + eps)
    rel_var = variances.std(axis=0, ddof=1) / math.sqrt(k) / (pooled_var + eps)
    expected = max(rel_mean.max(), rel_var.max())
    got = tracker.relative_standard_error(total, eps)
    assert got == pytest.approx(expected, rel=1e-9)
    # and it is the right size: iid batches give 1/sqrt(b k) for the mean, sqrt(2/(b-1)/k) for var
    theory = math.sqrt(2 / (b - 1) / k)
    assert 0.6 * theory < got < 1.6 * theory


def test_spread_tracker_ignores_empty_chunks() -> None:
    tracker = SpreadTracker()
    tracker.add_rows(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64))
    assert tracker.k == 0


def test_pool_layers_matches_pool_rows_layer_by_layer() -> None:
    rng = np.random.default_rng(6)
    k, channels, ns = 5, [3, 1, 4], [7, 30, 2]
    means = [torch.tensor(rng.normal(10.0, 1.0, size=(k, c))) for c in channels]
    variances = [torch.tensor(rng.random((k, c)) + 0.5) for c in channels]
    rows = torch.stack([torch.cat(means, dim=1), torch.cat(variances, dim=1)])
    means[1][3, 0] = variances[2][1, 2] = float("nan")  # after the copy: only the checks see it
    rows[0, 3, 3] = rows[1, 1, 6] = float("nan")
    got_means, got_m2, checks = pool_layers(rows.clone(), ns, channels)
    for m, v, n, mean, m2, check in zip(means, variances, ns, got_means, got_m2, checks):
        finite = torch.isfinite(m).all(dim=1) & torch.isfinite(v).all(dim=1)
        assert check.isfinite().tolist() == finite.tolist()
        if not finite.all():
            continue
        want = pool_rows([n] * k, m, v)
        np.testing.assert_allclose(mean.numpy(), want.mean.numpy(), rtol=1e-13)
        np.testing.assert_allclose(m2.numpy(), want.m2.numpy(), rtol=1e-12)


def test_pool_layers_checks_name_the_bad_call() -> None:
    rng = np.random.default_rng(7)
    k, channels, ns = 4, [2, 2, 2, 5], [3, 4, 5, 6]
    means = [torch.tensor(rng.normal(-3.0, 2.0, size=(k, c))) for c in channels]
    variances = [torch.tensor(rng.random((k, c)) + 0.1) for c in channels]
    rows = torch.stack([torch.cat(means, dim=1), torch.cat(variances, dim=1)])
    rows[1, 2, 3] = float("inf")  # layer 1, call 2
    got_means, got_m2, checks = pool_layers(rows, ns, channels)
    assert [c.isfinite().tolist() for c in checks] == [
        [True] * 4,
        [True, True, False, True],
        [True] * 4,
        [True] * 4,
    ]
    for layer in (0, 2, 3):
        want = pool_rows([ns[layer]] * k, means[layer], variances[layer])
        np.testing.assert_allclose(got_means[layer].numpy(), want.mean.numpy(), rtol=1e-13)
        np.testing.assert_allclose(got_m2[layer].numpy(), want.m2.numpy(), rtol=1e-12)


def _numpy_drift(
    old_m: np.ndarray, old_v: np.ndarray, new_m: np.ndarray, new_v: np.ndarray, eps: float
) -> list[float]:
    shift = np.abs(new_m - old_m) / np.sqrt(new_v + eps)
    logvar = np.abs(np.log((new_v + eps) / (old_v + eps)))
    return [float(shift.mean()), float(shift.max()), float(logvar.mean()), float(logvar.max())]


@pytest.mark.parametrize("eps", [[1e-5] * 4, [1e-5, 1e-3, 0.1, 1e-5]])
def test_drifts_match_numpy_layer_by_layer(eps: list[float]) -> None:
    rng = np.random.default_rng(8)
    widths = [3, 1, 5, 3]
    old_m = [rng.normal(0.0, 1.0, w) for w in widths]
    old_v = [rng.random(w) + 0.2 for w in widths]
    new_m = [rng.normal(0.5, 1.0, w) for w in widths]
    new_v = [rng.random(w) + 0.1 for w in widths]
    old_m[3][1] = np.nan  # stale statistics before the call: a NaN drift, still finite new
    new_v[2][4] = np.inf  # non-finite new statistics in one layer only
    got = drifts(
        [torch.tensor(m, dtype=torch.float32) for m in old_m],  # buffers' dtype
        [torch.tensor(v, dtype=torch.float32) for v in old_v],
        [torch.tensor(m) for m in new_m],
        [torch.tensor(v) for v in new_v],
        eps,
    )
    assert [finite for finite, _ in got] == [True, True, False, True]
    for i, (_, moved) in enumerate(got):
        want = _numpy_drift(
            old_m[i].astype(np.float32).astype(np.float64),
            old_v[i].astype(np.float32).astype(np.float64),
            new_m[i],
            new_v[i],
            eps[i],
        )
        values = [
            moved.mean_shift,
            moved.mean_shift_max,
            moved.log_var_ratio,
            moved.log_var_ratio_max,
        ]
        if i == 3:  # the NaN channel makes the mean shift NaN; the variance terms are unaffected
            assert np.isnan(values[0]) and np.isnan(values[1])
            np.testing.assert_allclose(values[2:], want[2:], rtol=1e-12)
        elif i != 2:
            np.testing.assert_allclose(values, want, rtol=1e-12)
    assert drifts([], [], [], [], []) == []
