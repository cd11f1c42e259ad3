"""The one-shot plan: an exact 0/1 integer program over per-component loss estimates.

Choose the set L of components that go low to minimize the sum of their estimated loss
increases, subject to the budget: the sizes of L add up to at least the target (the share of
parameters or MACs, or the bits to save). This is how NVIDIA ModelOpt's ``auto_quantize``
uses gradient scores; with mpqc's empirical-Fisher scores (``sensitivity``) it is the
``knapsack`` sampler, and the start of the ``refine`` strategy, which re-solves it with
scores corrected by measured losses. Solved by ``scipy.optimize.milp`` (HiGHS) exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

_FEASIBILITY = 1e-9  # sizes are shares of the budget's total: far below any component's size


def solve_knapsack(
    scores: Mapping[str, float],
    sizes: Mapping[str, float],
    target: float,
    *,
    exclude: Iterable[Collection[str]] = (),
) -> list[str] | None:
    """The set of components of least total score whose sizes reach ``target`` (sorted names),
    or None when no set outside ``exclude`` (sets already tried) reaches it.

    Among sets of equal score the one of least total size wins (a tie-break weighted far
    below any score difference), so a zero-score component is not sent low for nothing.
    """
    names = sorted(scores)
    if not names:
        return [] if target <= _FEASIBILITY else None
    score = np.array([float(scores[n]) for n in names])
    size = np.array([float(sizes[n]) for n in names])
    scale = max(float(np.max(np.abs(score))), 1e-300)
    cost = score / scale + 1e-7 * size / max(float(np.sum(np.abs(size))), 1e-300)
    constraints = [LinearConstraint(size[None, :], lb=target - _FEASIBILITY, ub=np.inf)]
    known = set(names)
    constraints += [_no_good_cut(names, chosen) for chosen in exclude if set(chosen) <= known]
    # mip_rel_gap 0: the optimum itself, not one within HiGHS's default 0.01% of it.
    res = milp(
        cost,
        constraints=constraints,
        integrality=np.ones(len(names)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        return None
    return [n for n, x in zip(names, res.x) if x > 0.5]


def _no_good_cut(names: list[str], chosen: Collection[str]) -> LinearConstraint:
    """Excludes exactly the set ``chosen``: sum_{c in S} x_c - sum_{c not in S} x_c <= |S| - 1."""
    chosen = set(chosen)
    row = np.array([1.0 if n in chosen else -1.0 for n in names])
    return LinearConstraint(row[None, :], lb=-np.inf, ub=len(chosen) - 1)
