"""Scaling-law fits for mixed quantization (Cao et al. 2024) and reading Q_r,max off a ratio curve.

Law 1 (model size vs the largest quantization ratio at a loss budget), in the paper's form

    size = exp(k * (1 - Q_r,max) + c)

    fit = fit_exponential(x, y)   # x = 1 - Q_r,max: the share of parameters kept high
                                  # y = model size (parameters; c depends on the unit, k does not)

Law 2 (loss vs quantizer block size at a fixed Q_r):

    delta_ppl = A * block_size ** k

    fit = fit_power(block_sizes, delta_ppls)

Both are fitted by least squares on the logarithm of y (a straight line in log space), which
weighs every point by its relative error: right for sizes spanning orders of magnitude and for
losses whose noise grows with their size. Standard errors come from the fit's covariance
(scipy's ``linregress``); R^2 is measured in that same log space.

``max_ratio_at_budget(ratios, delta_ppls, budget)`` turns one model's searched points into
Q_r,max for a loss budget.

Law 1 as a test (the stable direction: the noisy Q_r,max is the response, not the size):

    test = slope_test(sizes, q_max, clusters=None, n_boot=2000, seed=0)
    test.slope, test.ci_low, test.ci_high, test.p_value   # per decade of size; H1: slope > 0

``implied_slope(k)`` is the slope per decade that the paper's exponential form with this k
implies (k = -11.68 gives +0.197), the number a slope test's interval is read against.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

__all__ = [
    "ExponentialFit",
    "MaxRatio",
    "PowerFit",
    "SlopeTest",
    "fit_exponential",
    "fit_power",
    "implied_slope",
    "max_ratio_at_budget",
    "max_ratios_at_budget",
    "monotone_envelope",
    "slope_test",
]

MIN_POINTS = 3  # two points fit any line exactly and leave no degree of freedom for an error


@dataclasses.dataclass(frozen=True)
class _Line:
    slope: float
    intercept: float
    slope_err: float
    intercept_err: float
    r2: float
    n: int


def _as_points(x, y, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: x and y must have the same length, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what}: x and y must be finite; got x={x.tolist()}, y={y.tolist()}")
    if x.size < MIN_POINTS:
        raise ValueError(
            f"{what}: needs at least {MIN_POINTS} points (two fit any curve exactly and "
            f"give no uncertainty), got {x.size}"
        )
    return x, y


def _require_positive(values: np.ndarray, *, name: str, what: str) -> None:
    bad = [float(v) for v in values if not v > 0]
    if bad:
        raise ValueError(
            f"{what}: {name} must be positive to take its logarithm; got {bad} "
            f"(drop those points, e.g. delta_ppl <= 0 from search noise, before fitting)"
        )


def _line(u: np.ndarray, v: np.ndarray, *, what: str) -> _Line:
    if np.ptp(u) == 0:
        raise ValueError(f"{what}: all x values are equal ({u[0]:g}); a slope needs at least two distinct x")
    res = stats.linregress(u, v)
    # linregress's stderr is from the residual variance with n - 2 degrees of freedom.
    resid = v - (res.slope * u + res.intercept)
    ss_tot = float(np.sum((v - v.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return _Line(float(res.slope), float(res.intercept), float(res.stderr), float(res.intercept_stderr), r2, u.size)


@dataclasses.dataclass(frozen=True)
class ExponentialFit:
    """y = exp(k * x + c); ``k_err``/``c_err`` are one standard error; ``r2`` is of ln y."""

    k: float
    c: float
    k_err: float
    c_err: float
    r2: float
    n: int

    def predict(self, x):
        """y at x (scalar or array)."""
        return np.exp(self.k * np.asarray(x, dtype=float) + self.c)

    def solve(self, y):
        """x at which the law reaches y; for Law 1, 1 - Q_r,max of a model of size y."""
        return (np.log(np.asarray(y, dtype=float)) - self.c) / self.k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PowerFit:
    """y = A * x ** k; ``A_err`` is the delta-method error A * err(ln A); ``r2`` is of ln y."""

    A: float
    k: float
    A_err: float
    k_err: float
    r2: float
    n: int

    def predict(self, x):
        return self.A * np.asarray(x, dtype=float) ** self.k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_exponential(x, y) -> ExponentialFit:
    """Fit y = exp(k * x + c) by a line through (x, ln y).

    For Law 1: x = 1 - Q_r,max (the share of matmul parameters kept in high precision at the
    loss budget), y = model size in parameters. The paper reports k about -11 to -13.
    """
    what = "fit_exponential"
    x, y = _as_points(x, y, what=what)
    _require_positive(y, name="y (model size)", what=what)
    line = _line(x, np.log(y), what=what)
    return ExponentialFit(
        k=line.slope, c=line.intercept, k_err=line.slope_err, c_err=line.intercept_err, r2=line.r2, n=line.n
    )


def fit_power(x, y) -> PowerFit:
    """Fit y = A * x ** k by a line through (ln x, ln y).

    For Law 2: x = block size (elements per shared scale), y = delta_ppl at a fixed Q_r.
    The paper reports k about 0.3 to 0.6.
    """
    what = "fit_power"
    x, y = _as_points(x, y, what=what)
    _require_positive(x, name="x (block size)", what=what)
    _require_positive(y, name="y (delta_ppl)", what=what)
    line = _line(np.log(x), np.log(y), what=what)
    A = math.exp(line.intercept)
    return PowerFit(A=A, k=line.slope, A_err=A * line.intercept_err, k_err=line.slope_err, r2=line.r2, n=line.n)


# ---- Q_r,max from a ratio curve ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaxRatio:
    """The largest Q_r whose (enveloped) delta_ppl stays within the budget.

    ``status``: "interpolated" (the budget is crossed between two measured ratios),
    "above_measured" (every measured ratio meets the budget: ``value`` is the largest measured
    ratio, a lower bound), "all_low" (a plan with every searchable component low, Q_r = 1, meets
    it: ``value`` is 1, exact, since no larger Q_r exists) or "never_reached" (even the smallest
    measured ratio exceeds the budget: ``value`` is NaN).
    """

    value: float
    status: str

    @property
    def reached(self) -> bool:
        return self.status != "never_reached"


def monotone_envelope(ratios, delta_ppls) -> tuple[np.ndarray, np.ndarray]:
    """(ratios sorted ascending, the best delta_ppl known at each ratio or above).

    A plan found under "Q_r >= r'" also meets "Q_r >= r" for every r <= r', so the best loss at r
    is at most the best at any larger ratio: the suffix minimum. It is nondecreasing in r by
    construction and removes search noise that would make a curve dip. ``delta_ppls`` may also be
    a matrix with one curve per row (the same ratios): each row is enveloped.
    """
    r = np.asarray(ratios, dtype=float).ravel()
    d = np.asarray(delta_ppls, dtype=float)
    if d.ndim not in (1, 2) or r.shape != d.shape[-1:] or r.size == 0:
        raise ValueError(
            f"ratios and delta_ppls must be non-empty and of the same length, got {r.size} and {d.shape[-1:]}"
        )
    if not np.all(np.isfinite(r)):
        raise ValueError(f"ratios must be finite, got {r.tolist()}")
    d = np.where(np.isnan(d), np.inf, d)  # a broken plan (NaN perplexity) is as bad as can be
    order = np.argsort(r, kind="stable")
    r, d = r[order], d[..., order]
    return r, np.flip(np.minimum.accumulate(np.flip(d, -1), axis=-1), -1)


STATUSES = ("never_reached", "interpolated", "above_measured", "all_low")
# The statuses whose value is Q_r,max itself, not a bound: the points a law is fitted and tested on.
READ_STATUSES = ("interpolated", "all_low")
ALL_LOW_Q_R = 1.0 - 1e-9  # an achieved Q_r this close to 1 is the plan with every searchable component low


def max_ratio_at_budget(ratios, delta_ppls, budget: float) -> MaxRatio:
    """The largest achievable Q_r at a loss budget (e.g. 0.1 for +10% perplexity).

    ``ratios`` are the achieved Q_r of searched plans, ``delta_ppls`` their (ppl_q - ppl) / ppl.
    The curve is first made monotone (:func:`monotone_envelope`); the budget is then read off by
    linear interpolation between the last ratio within it and the next one above it.
    """
    values, status = max_ratios_at_budget(ratios, np.asarray(delta_ppls, dtype=float).reshape(1, -1), budget)
    return MaxRatio(float(values[0]), STATUSES[status[0]])


def max_ratios_at_budget(ratios, delta_draws, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_ratio_at_budget` for many curves over the same ratios at once (``delta_draws``:
    one row of delta_ppls per curve, e.g. per resample of the evaluation windows): (values,
    status index into ``STATUSES``: never_reached, interpolated, above_measured, all_low), NaN
    where never reached."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget is a positive relative perplexity increase such as 0.1, got {budget!r}")
    r, env = monotone_envelope(ratios, delta_draws)
    if env.ndim != 2:
        raise ValueError(f"delta_draws must be a matrix, one curve per row, got shape {env.shape}")
    rows = np.arange(env.shape[0])
    i = np.count_nonzero(env <= budget, axis=1) - 1  # env is nondecreasing: 0..i are within the budget
    last = np.maximum(i, 0)  # the last ratio within it (index 0 where none is: masked below)
    above = (i >= 0) & (r[last] == r[-1])  # within it at the largest measured ratio
    inside = (i >= 0) & ~above
    after = np.minimum(i + 1, r.size - 1)
    r0, r1 = r[last], r[after]
    d0, d1 = env[rows, last], env[rows, after]
    with np.errstate(invalid="ignore", divide="ignore"):
        # the next plan diverged (d1 infinite): no slope to interpolate along, r0 stands
        step = np.where(np.isfinite(d1) & (d1 > d0), (budget - d0) * (r1 - r0) / (d1 - d0), 0.0)
    values = np.where(above, r0, np.where(inside, r0 + step, np.nan))
    status = np.where(above, np.where(r0 >= ALL_LOW_Q_R, 3, 2), np.where(inside, 1, 0))
    return values, status


# ---- Law 1 as a slope test ----------------------------------------------------------------------

CI_LEVEL = 0.95
MIN_BOOT = 100  # fewer resamples cannot place a 2.5% percentile
_REDRAWS = 100  # rounds of redrawing resamples whose sizes are all equal (no slope) before giving up


@dataclasses.dataclass(frozen=True)
class SlopeTest:
    """OLS slope of Q_r,max on log10(size), with a 95% percentile-bootstrap interval and the
    one-sided bootstrap p-value of "slope > 0". ``intercept`` is the line's Q_r,max at size 1
    (log10 size = 0). ``n_clusters`` is the number of resampled units: the points themselves
    (``n``) without clusters."""

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    n_sizes: int
    n_clusters: int
    n_boot: int
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def implied_slope(k: float) -> float:
    """d Q_r,max / d log10(size) of Law 1, size = exp(k (1 - Q_r,max) + c): -ln(10) / k."""
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k != 0):
        raise ValueError(f"k is Law 1's finite, non-zero exponent (the paper: about -11 to -13), got {k!r}")
    return -math.log(10) / k


def slope_test(sizes, q_max, clusters=None, n_boot: int = 2000, seed: int = 0, q_max_draws=None) -> SlopeTest:
    """Does Q_r,max grow with model size? The OLS slope of ``q_max`` on log10(``sizes``) per
    decade, a 95% percentile-bootstrap interval, and the one-sided p-value of slope > 0.

    Each point is one (model, training seed, search seed, ...) Q_r,max. Without ``clusters`` the
    bootstrap resamples points; with ``clusters`` (one label per point, e.g. "train seed 1 x
    search seed 2") it resamples whole clusters, so points that share a seed (and its noise)
    move together and the interval is not made narrow by treating them as independent. The
    p-value is (1 + resamples with slope <= 0) / (1 + n_boot): the level at which the
    one-sided percentile bound reaches zero, never exactly 0. Seeded: the same inputs and
    ``seed`` give the same numbers.

    ``q_max_draws`` (``n_boot`` x points) adds the evaluation windows' noise: row b holds every
    point's Q_r,max read off its curve on the b-th resample of the windows, and resample b of
    the clusters takes its values from it. NaN there (the budget no longer crossed inside the
    measured ratios on those windows) leaves the point out of that resample, as the fit does.
    """
    u, y, groups = _slope_points(sizes, q_max, clusters)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < MIN_BOOT:
        raise ValueError(f"n_boot must be an int >= {MIN_BOOT} (resamples of the bootstrap), got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    draws = _draws(q_max_draws, n_boot, u.size)
    line = _weighted_slopes(u, y, np.ones((1, u.size)))
    slopes = _bootstrap_slopes(u, y, groups, n_boot, np.random.default_rng(seed), draws)
    tail = (1 - CI_LEVEL) / 2
    low, high = np.quantile(slopes, [tail, 1 - tail])
    slope = float(line[0])
    return SlopeTest(
        slope=slope,
        intercept=float(np.mean(y) - slope * np.mean(u)),
        ci_low=float(low),
        ci_high=float(high),
        p_value=float((1 + np.count_nonzero(slopes <= 0)) / (1 + n_boot)),
        n=int(u.size),
        n_sizes=int(np.unique(u).size),
        n_clusters=int(np.unique(groups).size),
        n_boot=n_boot,
        seed=seed,
    )


def _slope_points(sizes, q_max, clusters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log10 sizes, q_max, cluster index per point), checked."""
    what = "slope_test"
    x = np.asarray(sizes, dtype=float).ravel()
    y = np.asarray(q_max, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: sizes and q_max must have the same length, got {x.size} and {y.size}")
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise ValueError(
            f"{what}: sizes and q_max must be finite (drop never-reached Q_r,max, which are NaN); "
            f"got sizes={x.tolist()}, q_max={y.tolist()}"
        )
    _require_positive(x, name="sizes", what=what)
    if np.unique(x).size < MIN_POINTS:
        raise ValueError(
            f"{what}: needs at least {MIN_POINTS} distinct sizes (two fit any line and leave no test), "
            f"got {np.unique(x).size}: {sorted(set(x.tolist()))}"
        )
    if clusters is None:
        return np.log10(x), y, np.arange(x.size)
    labels = list(clusters)
    if len(labels) != x.size:
        raise ValueError(f"{what}: clusters must give one label per point ({x.size}), got {len(labels)}")
    index = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    if len(index) < 2:
        raise ValueError(f"{what}: a cluster bootstrap needs at least 2 clusters, got {len(index)}: {list(index)}")
    return np.log10(x), y, np.array([index[label] for label in labels])


def _draws(q_max_draws, n_boot: int, n: int) -> np.ndarray | None:
    """``q_max_draws`` checked: None, or an ``n_boot`` x ``n`` matrix of finite values or NaN."""
    if q_max_draws is None:
        return None
    d = np.asarray(q_max_draws, dtype=float)
    if d.shape != (n_boot, n):
        raise ValueError(f"slope_test: q_max_draws must be n_boot x points = {(n_boot, n)}, got {d.shape}")
    if np.any(np.isinf(d)):
        raise ValueError("slope_test: q_max_draws must be finite or NaN (a point left out of that resample)")
    return d


def _weighted_slopes(u: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The OLS slope of y on u for each row of point weights ``w`` (how often a resample drew
    each point); NaN where the drawn points have one size only. ``y`` is one vector, or one row
    per row of ``w``, whose NaNs weigh nothing."""
    missing = np.isnan(y)
    w, y = np.where(missing, 0.0, w), np.where(missing, 0.0, y)
    total = w.sum(axis=1, keepdims=True)
    du = u - (w * u).sum(axis=1, keepdims=True) / total
    dy = y - (w * y).sum(axis=1, keepdims=True) / total
    sxx = (w * du * du).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # a spread far below float rounding of the sizes is no spread: no slope
        return np.where(sxx > 1e-12 * max(1.0, float(np.max(u * u))), (w * du * dy).sum(axis=1) / sxx, np.nan)


def _bootstrap_slopes(u, y, groups, n_boot: int, rng: np.random.Generator, y_draws=None) -> np.ndarray:
    """``n_boot`` slopes, each of the clusters (or points) drawn with replacement (resample b
    with the values of ``y_draws[b]``, when given); a resample with one size only has no slope
    and is drawn again."""
    n_groups = int(groups.max()) + 1
    slopes = np.full(n_boot, np.nan)
    todo = np.arange(n_boot)
    for _ in range(_REDRAWS):
        draws = rng.integers(0, n_groups, size=(todo.size, n_groups))
        counts = np.zeros((todo.size, n_groups))
        np.add.at(counts, (np.arange(todo.size)[:, None], draws), 1.0)
        slopes[todo] = _weighted_slopes(u, y if y_draws is None else y_draws[todo], counts[:, groups])
        todo = todo[np.isnan(slopes[todo])]
        if todo.size == 0:
            return slopes
    raise ValueError(
        f"slope_test: {todo.size} of {n_boot} resamples still held one size only after {_REDRAWS} redraws; "
        "each cluster should span several sizes (e.g. cluster by seed, not by model)"
    )
