"""Paired bootstrap intervals against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.evaluation.bootstrap import PairedBootstrap


def test_identical_runs_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    a = rng.random(500)  # per-user metric values, wildly different between users
    ci = PairedBootstrap(500, n_resamples=500, seed=1).interval(a, a.copy())
    assert ci.low <= 0.0 <= ci.high
    assert ci.high - ci.low < 1e-12
    assert not ci.excludes_zero


def test_interval_matches_the_normal_approximation():
    """For a mean of n i.i.d. differences the 95 % interval is mean ± 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(3)
    n, mu, sd = 4000, 0.02, 0.3
    d = rng.normal(mu, sd, n)
    ci = PairedBootstrap(n, n_resamples=2000, seed=0).interval(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert ci.mean == pytest.approx(d.mean())
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    assert ci.low == pytest.approx(d.mean() - half, abs=0.2 * half)


def test_pairing_removes_the_between_user_variance():
    """B = A + 0.01 for every user: the paired interval is exactly 0.01 wide 0, however noisy A is."""
    rng = np.random.default_rng(5)
    a = rng.random(300)
    ci = PairedBootstrap(300, n_resamples=300, seed=2).interval(a + 0.01, a)
    assert ci.low == pytest.approx(0.01) and ci.high == pytest.approx(0.01)
    assert ci.excludes_zero


def test_coverage_is_close_to_95_percent():
    rng = np.random.default_rng(11)
    boot = PairedBootstrap(200, n_resamples=400, seed=0)
    covered = 0
    for _ in range(200):
        d = rng.exponential(1.0, 200) - 1.0  # skewed, true mean 0
        ci = boot.interval(d)
        covered += ci.low <= 0.0 <= ci.high
    assert 0.88 <= covered / 200 <= 0.99


def test_same_seed_same_interval_and_columns_share_resamples():
    rng = np.random.default_rng(0)
    a, b = rng.random((100, 3)), rng.random((100, 3))
    one = PairedBootstrap(100, 200, seed=7).intervals(a, b)
    two = PairedBootstrap(100, 200, seed=7).intervals(a, b)
    other = PairedBootstrap(100, 200, seed=8).intervals(a, b)
    assert one == two
    assert one != other
    # Column j alone gives the same interval as column j among others.
    alone = PairedBootstrap(100, 200, seed=7).interval(a[:, 1], b[:, 1])
    assert (alone.mean, alone.low, alone.high) == pytest.approx((one[1].mean, one[1].low, one[1].high), abs=1e-12)


def test_wrong_length_is_refused():
    with pytest.raises(ValueError, match="expected 10 rows"):
        PairedBootstrap(10, 20).interval(np.zeros(11))


def test_weights_built_in_blocks_equal_one_draw_of_every_resample(monkeypatch):
    """The counts are drawn a block of resamples at a time (memory); they must be those of one
    [B, n] draw from the same seed, or every interval of a report would change."""
    import recsys.evaluation.bootstrap as bootstrap

    n, b, seed = 37, 50, 7
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
    expected = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
    monkeypatch.setattr(bootstrap, "_BLOCK_DRAWS", 3 * n + 1)  # blocks of 3 resamples, the last one of 2
    boot = PairedBootstrap(n, n_resamples=b, seed=seed)
    assert np.array_equal(boot.counts, expected) and (expected.sum(1) == n).all()
    # Means taken a few resamples at a time are the one product of every resample's weights.
    values = rng.random((n, 3))
    np.testing.assert_allclose(boot.resampled_means(values), (expected / n) @ values, rtol=1e-12)
