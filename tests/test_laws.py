"""mpqc.studies.laws: fits recover known laws from seeded noisy data; Q_r,max read off ratio curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpqc.studies.laws import (
    READ_STATUSES,
    fit_exponential,
    fit_power,
    implied_slope,
    max_ratio_at_budget,
    max_ratios_at_budget,
    monotone_envelope,
    slope_test,
)

SIGMA = 0.05  # multiplicative noise: ln y gets N(0, SIGMA^2)


def law1_data(seed, k=-12.0, c=25.0, n=8):
    rng = np.random.default_rng(seed)
    x = np.linspace(0.1, 0.4, n)  # 1 - Q_r,max
    return x, np.exp(k * x + c + rng.normal(0, SIGMA, n))


def law2_data(seed, A=0.002, k=0.45):
    rng = np.random.default_rng(seed)
    x = np.array([16, 32, 64, 128, 256, 512], dtype=float)
    return x, A * x**k * np.exp(rng.normal(0, SIGMA, x.size))


def slope_se(u):
    # Standard error of a least-squares slope with known noise: sigma / sqrt(sum (u - mean)^2).
    u = np.asarray(u)
    return SIGMA / math.sqrt(np.sum((u - u.mean()) ** 2))


def test_fit_exponential_recovers_law1():
    x, y = law1_data(seed=0)
    fit = fit_exponential(x, y)
    se = slope_se(x)  # 0.18 for these 8 points
    # 4 standard errors: a seeded draw this far out would be a 1-in-15000 event, not noise.
    assert abs(fit.k - -12.0) < 4 * se
    assert abs(fit.c - 25.0) < 4 * se * math.sqrt(np.mean(x**2))  # intercept error = slope error x rms(x)
    # The reported errors estimate the true ones (sigma estimated from 6 degrees of freedom: within 2x).
    assert 0.5 * se < fit.k_err < 2 * se
    assert fit.r2 > 0.99 and fit.n == 8
    assert np.allclose(fit.predict(x), np.exp(fit.k * x + fit.c))
    assert np.allclose(fit.solve(fit.predict(x)), x)


def test_fit_power_recovers_law2():
    x, y = law2_data(seed=1)
    fit = fit_power(x, y)
    se = slope_se(np.log(x))  # 0.017
    assert abs(fit.k - 0.45) < 4 * se
    # ln A has error se * rms(ln x) (about 4.7 x se here); 4 of those, relative.
    assert abs(math.log(fit.A / 0.002)) < 4 * se * math.sqrt(np.mean(np.log(x) ** 2))
    assert fit.A_err > 0 and fit.r2 > 0.99
    assert np.allclose(fit.predict(x), fit.A * x**fit.k)


def test_reported_errors_are_calibrated():
    # Over many seeded data sets the true k lies within one reported standard error about as
    # often as Student's t with n - 2 = 6 degrees of freedom says: P(|t| < 1) = 0.644.
    fits = [fit_exponential(*law1_data(seed=s)) for s in range(400)]
    hits = [abs(f.k + 12.0) < f.k_err for f in fits]
    # 400 draws: the share has standard deviation sqrt(0.644 * 0.356 / 400) = 0.024; allow 2.5 of them.
    assert abs(np.mean(hits) - 0.644) < 0.06


def test_exact_data_is_fitted_exactly():
    x = np.array([0.1, 0.2, 0.3])
    fit = fit_exponential(x, np.exp(-11.5 * x + 20))
    assert fit.k == pytest.approx(-11.5, rel=1e-12) and fit.c == pytest.approx(20, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.k_err == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("fit", [fit_exponential, fit_power])
def test_too_few_points(fit):
    with pytest.raises(ValueError, match="at least 3 points"):
        fit([1.0, 2.0], [1.0, 2.0])


def test_non_positive_values_are_named():
    with pytest.raises(ValueError, match=r"y \(model size\) must be positive.*-1.0"):
        fit_exponential([0.1, 0.2, 0.3], [1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match=r"y \(delta_ppl\) must be positive.*0.0"):
        fit_power([16, 32, 64], [0.01, 0.0, 0.02])
    with pytest.raises(ValueError, match=r"x \(block size\) must be positive"):
        fit_power([0, 32, 64], [0.01, 0.01, 0.02])


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match="same length"):
        fit_exponential([0.1, 0.2, 0.3], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        fit_exponential([0.1, 0.2, math.nan], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="all x values are equal"):
        fit_exponential([0.2, 0.2, 0.2], [1.0, 2.0, 3.0])


# ---- Q_r,max ----------------------------------------------------------------------------------


def test_max_ratio_interpolates_linearly():
    ratios = [0.5, 0.6, 0.7, 0.8, 0.9]
    deltas = [0.01, 0.03, 0.06, 0.12, 0.30]
    m = max_ratio_at_budget(ratios, deltas, 0.10)
    assert m.status == "interpolated"
    assert m.value == pytest.approx(0.7 + (0.10 - 0.06) / (0.12 - 0.06) * 0.1)  # 0.7667
    assert max_ratio_at_budget(ratios, deltas, 0.06).value == pytest.approx(0.7)  # exactly at a point
    assert max_ratio_at_budget(list(reversed(ratios)), list(reversed(deltas)), 0.10).value == pytest.approx(m.value)


def test_envelope_removes_search_noise():
    # The plan found at 0.8 (delta 0.04) also meets Q_r >= 0.7, so 0.7's noisy 0.09 is no bound.
    r, env = monotone_envelope([0.6, 0.7, 0.8, 0.9], [0.03, 0.09, 0.04, 0.2])
    assert r.tolist() == [0.6, 0.7, 0.8, 0.9] and env.tolist() == [0.03, 0.04, 0.04, 0.2]
    assert max_ratio_at_budget([0.6, 0.7, 0.8, 0.9], [0.03, 0.09, 0.04, 0.2], 0.05).value == pytest.approx(
        0.8 + (0.05 - 0.04) / (0.2 - 0.04) * 0.1
    )


def test_max_ratio_edge_cases():
    never = max_ratio_at_budget([0.5, 0.9], [0.2, 0.4], 0.05)
    assert math.isnan(never.value) and never.status == "never_reached" and not never.reached
    above = max_ratio_at_budget([0.5, 0.9], [0.01, 0.02], 0.05)
    assert above.value == 0.9 and above.status == "above_measured"
    # Within the budget at Q_r = 1 (one of two seeds' plans there): Q_r,max is 1 itself, not a bound.
    tied = max_ratio_at_budget([0.5, 1.0, 1.0], [0.01, 0.03, 0.08], 0.05)
    assert tied.value == 1.0 and tied.status == "all_low" and tied.status in READ_STATUSES
    assert max_ratio_at_budget([0.5, 0.999], [0.01, 0.03], 0.05).status == "above_measured"
    diverged = max_ratio_at_budget([0.5, 0.9], [0.01, math.nan], 0.05)  # NaN perplexity counts as infinite
    assert diverged.value == 0.5 and diverged.status == "interpolated"
    with pytest.raises(ValueError, match="positive relative perplexity"):
        max_ratio_at_budget([0.5], [0.01], 0.0)
    with pytest.raises(ValueError, match="same length"):
        max_ratio_at_budget([0.5, 0.6], [0.01], 0.1)


# ---- the slope test of Law 1 -------------------------------------------------------------------

SIZES = np.geomspace(1e4, 1e6, 6)  # 6 sizes over 2 decades
SLOPE = 0.1  # planted: Q_r,max rises 0.1 per decade


def slope_data(seed, *, seeds=5, slope=SLOPE, cluster_sd=0.0, noise=0.05):
    """Q_r,max per (size, seed): a line in log10(size) plus noise; each seed (a cluster) has its
    own slope deviation of sd ``cluster_sd``, shared by all its sizes."""
    rng = np.random.default_rng(seed)
    sizes, q, clusters = [], [], []
    for s in range(seeds):
        own = slope + rng.normal(0, cluster_sd) if cluster_sd else slope
        for size in SIZES:
            sizes.append(size)
            q.append(0.5 + own * math.log10(size / 1e5) + rng.normal(0, noise))
            clusters.append(f"seed {s}")
    return np.array(sizes), np.array(q), clusters


def test_slope_test_recovers_a_planted_slope():
    sizes, q, _ = slope_data(0)
    t = slope_test(sizes, q)
    u = np.log10(sizes)
    se = 0.05 / math.sqrt(np.sum((u - u.mean()) ** 2))  # the OLS slope's standard error with known noise
    assert abs(t.slope - SLOPE) < 3 * se and t.ci_low < SLOPE < t.ci_high
    assert t.ci_high - t.ci_low == pytest.approx(2 * 1.96 * se, rel=0.35)  # a 30-point bootstrap of a known SE
    assert t.p_value == 1 / 2001  # every resample's slope is positive: the smallest p-value there is
    assert (t.n, t.n_sizes, t.n_clusters, t.n_boot) == (30, 6, 30, 2000)
    exact = slope_test(sizes, 0.3 + 0.2 * np.log10(sizes), n_boot=200)  # a noiseless line: exact
    assert exact.slope == pytest.approx(0.2, abs=1e-12) and exact.intercept == pytest.approx(0.3, abs=1e-12)
    flat = slope_test(sizes, 0.5 + np.random.default_rng(3).normal(0, 0.05, sizes.size), n_boot=1000)
    assert flat.ci_low < 0 < flat.ci_high and 0.05 < flat.p_value < 0.95  # no trend: not significant


def test_95_percent_intervals_cover_the_planted_slope_at_the_nominal_rate():
    # 200 seeded replicates; the percentile bootstrap of 30 points covers 92.5% of them here (it
    # runs a little short at small n); [0.90, 0.99] is the nominal rate give or take about two
    # standard errors of a 200-replicate coverage (1.5 points), and fails an interval that is
    # too narrow or too wide.
    covered = [
        (t := slope_test(*slope_data(seed)[:2], n_boot=400, seed=seed)).ci_low <= SLOPE <= t.ci_high
        for seed in range(200)
    ]
    assert 0.90 <= np.mean(covered) <= 0.99


def test_the_cluster_bootstrap_covers_where_the_point_bootstrap_does_not():
    # Each of 12 seeds has its own slope (sd 0.05): the points of a seed are not independent. The
    # point bootstrap's intervals are too narrow (83.5% of these replicates covered); the cluster
    # bootstrap's cover near the nominal rate (94%).
    naive, clustered = [], []
    for seed in range(200):
        sizes, q, clusters = slope_data(seed, seeds=12, cluster_sd=0.05)
        a = slope_test(sizes, q, n_boot=400, seed=seed)
        b = slope_test(sizes, q, clusters=clusters, n_boot=400, seed=seed)
        assert a.slope == b.slope and b.n_clusters == 12
        naive.append(a.ci_low <= SLOPE <= a.ci_high)
        clustered.append(b.ci_low <= SLOPE <= b.ci_high)
    assert np.mean(naive) < 0.90 <= np.mean(clustered) <= 0.99


def window_tilt_data(seed, *, seeds=4, windows=32, tilt_sd=0.1, noise=0.02):
    """A flat family (true slope 0) measured on ``windows`` shared evaluation windows, each of
    which favours large or small models (its tilt, sd ``tilt_sd`` per decade): (sizes, q_max,
    clusters, per-window values [points x windows]). Every seed sees the same windows, so the
    windows' mean tilt moves every point together and no cluster resample can see it."""
    rng = np.random.default_rng(seed)
    tilt = rng.normal(0, tilt_sd, windows)
    sizes, clusters, per_window = [], [], []
    for s in range(seeds):
        for size in SIZES:
            sizes.append(size)
            clusters.append(f"seed {s}")
            per_window.append(0.5 + tilt * math.log10(size / 1e5) + rng.normal(0, noise, windows))
    per_window = np.array(per_window)
    return np.array(sizes), per_window.mean(axis=1), clusters, per_window


def resampled_windows(per_window, n_boot, seed):
    """Each point's mean over ``n_boot`` resamples of the windows (the same draw for every point)."""
    idx = np.random.default_rng(seed).integers(0, per_window.shape[1], (n_boot, per_window.shape[1]))
    return per_window[:, idx].mean(axis=2).T  # n_boot x points


def test_resampling_the_windows_covers_a_slope_the_shared_windows_fake():
    # With the windows' noise left out, the seeds' clusters take the windows' tilt for a slope
    # (7.5% of these 200 replicates covered the true 0); with q_max_draws the interval covers at
    # about the nominal rate (92.5%; the percentile bootstrap of 32 windows runs a little short).
    seeds_only, with_windows = [], []
    for seed in range(200):
        sizes, q, clusters, per_window = window_tilt_data(seed)
        a = slope_test(sizes, q, clusters=clusters, n_boot=400, seed=seed)
        draws = resampled_windows(per_window, 400, seed + 1000)
        b = slope_test(sizes, q, clusters=clusters, n_boot=400, seed=seed, q_max_draws=draws)
        assert a.slope == b.slope and b.ci_high - b.ci_low > a.ci_high - a.ci_low
        seeds_only.append(a.ci_low <= 0 <= a.ci_high)
        with_windows.append(b.ci_low <= 0 <= b.ci_high)
    assert np.mean(seeds_only) < 0.5 and 0.90 <= np.mean(with_windows) <= 0.99


def test_window_draws_equal_to_the_points_change_nothing_and_nans_leave_points_out():
    sizes, q, clusters = slope_data(2, seeds=3)
    plain = slope_test(sizes, q, clusters=clusters, n_boot=300, seed=4)
    same = slope_test(sizes, q, clusters=clusters, n_boot=300, seed=4, q_max_draws=np.tile(q, (300, 1)))
    assert same == plain
    # the smallest size not interpolated on half the resamples: those leave it out, the rest stand
    draws = np.tile(q, (300, 1))
    draws[::2, sizes == SIZES[0]] = np.nan
    holed = slope_test(sizes, q, clusters=clusters, n_boot=300, seed=4, q_max_draws=draws)
    assert holed.slope == plain.slope and np.isfinite([holed.ci_low, holed.ci_high]).all()
    with pytest.raises(ValueError, match=r"n_boot x points = \(300, 18\), got \(300, 17\)"):
        slope_test(sizes, q, clusters=clusters, n_boot=300, q_max_draws=draws[:, :-1])
    with pytest.raises(ValueError, match="finite or NaN"):
        slope_test(sizes, q, clusters=clusters, n_boot=300, q_max_draws=np.full((300, 18), np.inf))


def test_max_ratios_at_budget_reads_every_curve_as_one_at_a_time():
    def by_hand(r, d, budget):  # the reading written out: envelope, last point within, interpolate
        order = np.argsort(r, kind="stable")
        r, d = r[order], np.where(np.isnan(d[order]), np.inf, d[order])
        env = [min(d[i:]) for i in range(len(d))]
        within = [i for i in range(len(r)) if env[i] <= budget]
        if not within:
            return math.nan, 0
        i = within[-1]
        if r[i] == r[-1]:
            return r[i], 3 if r[i] == 1.0 else 2  # within the budget at Q_r = 1: all_low
        if not math.isfinite(env[i + 1]):
            return r[i], 1
        return r[i] + (budget - env[i]) * (r[i + 1] - r[i]) / (env[i + 1] - env[i]), 1

    rng = np.random.default_rng(0)
    seen = set()
    for top in (1.0, 0.95):  # curves that end at Q_r = 1 (all_low possible) and below it
        ratios = np.array([0.9, 0.3, 0.5, 0.5, 0.7, top])  # unsorted, with a tie
        deltas = rng.uniform(0, 0.3, (400, ratios.size)) * rng.uniform(0.2, 2, (400, 1))
        deltas[::7, 3] = np.nan  # broken plans
        deltas[::11, -1] = np.inf
        values, status = max_ratios_at_budget(ratios, deltas, 0.1)
        expected = [by_hand(ratios, d, 0.1) for d in deltas]
        assert status.tolist() == [e[1] for e in expected]
        np.testing.assert_allclose(values, [e[0] for e in expected], rtol=0, atol=1e-12)
        seen |= set(status.tolist())
    assert seen == {0, 1, 2, 3}  # every case met


def test_the_slope_test_is_seeded_and_reproducible():
    sizes, q, clusters = slope_data(1, seeds=4, cluster_sd=0.03)
    a = slope_test(sizes, q, clusters=clusters, n_boot=500, seed=7)
    assert slope_test(sizes, q, clusters=clusters, n_boot=500, seed=7) == a
    other = slope_test(sizes, q, clusters=clusters, n_boot=500, seed=8)
    assert other.slope == a.slope and (other.ci_low, other.ci_high) != (a.ci_low, a.ci_high)
    assert a.to_dict()["seed"] == 7


def test_slope_test_bad_input_is_named():
    sizes, q, clusters = slope_data(0, seeds=2)
    with pytest.raises(ValueError, match="same length, got 12 and 11"):
        slope_test(sizes, q[:-1])
    with pytest.raises(ValueError, match="at least 3 distinct sizes.*got 2"):
        slope_test([1e4, 1e4, 1e5, 1e5], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"sizes must be positive.*\[0.0, -5.0\]"):
        slope_test([1e4, 0, -5, 1e5], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="finite.*never-reached"):
        slope_test([1e4, 1e5, 1e6], [0.1, math.nan, 0.3])
    with pytest.raises(ValueError, match="one label per point \\(12\\), got 11"):
        slope_test(sizes, q, clusters=clusters[:-1])
    with pytest.raises(ValueError, match="at least 2 clusters, got 1"):
        slope_test(sizes, q, clusters=["all"] * len(q))
    with pytest.raises(ValueError, match="n_boot must be an int >= 100"):
        slope_test(sizes, q, n_boot=10)
    with pytest.raises(ValueError, match="seed must be an int"):
        slope_test(sizes, q, seed=1.5)


def test_implied_slope_of_the_papers_law1():
    assert implied_slope(-11.68) == pytest.approx(0.197, abs=5e-4)  # the issue's +0.197 per decade
    # the paper's form and the slope agree: Q_r,max = 1 - (ln size - c) / k
    k, c = -12.0, 20.0
    q = [1 - (math.log(s) - c) / k for s in SIZES]
    assert slope_test(SIZES, q, n_boot=100).slope == pytest.approx(implied_slope(k), rel=1e-12)
    with pytest.raises(ValueError, match="non-zero exponent"):
        implied_slope(0.0)
