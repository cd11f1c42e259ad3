"""Predicting a plan's delta_ppl from cheap measurements (after Xu et al. 2024, for mixed plans).

Xu et al. predict the quality of a post-training-quantized LLM with a statistical model of a
few factors: model size, the unquantized NLL, and the local loss landscape (how the loss rises
under weight noise of the quantizer's size). Here the same idea is applied to a mixed plan:
which components of one model go to the low format. Every measurement below is cheaper than
evaluating the plan, and all but one need no forward pass per plan at all.

Per model (once):

* ``params``: all parameters of the model (the regression uses its logarithm);
* ``nll_base``: the all-high NLL (nats per token) on calibration windows;
* ``noise_rise_all``: the NLL rise on the probe windows when every matmul weight gets Gaussian
  noise of the low format's size (per tensor: the RMS of q(W) - W); Xu's landscape factor.

Per plan (from one backward pass per calibration window, shared by every plan):

* ``ratio``: Q_r by parameters;
* ``fisher_diag``: the sum over the plan's low components of search/sensitivity.py's
  empirical-Fisher estimate (each component alone, cross terms ignored);
* ``fisher``: the same estimate for the plan's low components together, 0.5 * mean over windows
  of (sum of their first-order loss changes)^2, cross terms included. The per-window, per-
  component first-order changes g[w, c] come from one backward pass per window, so any plan's
  value is a dot product: no forward per plan;
* ``first_order``: mean over windows of that sum (the linear term of the loss change);
* ``weight_noise``: sum over the low weights of ||q(W) - W||^2 over sum over all matmul
  weights of ||W||^2: the plan's relative weight-noise energy (from the cached quantized weights);

and, with probe windows, one forward per plan:

* ``noise_rise``: the NLL rise on the probe windows with Gaussian weight noise of the low
  format's size on the plan's low components only (activations stay high). The noise of each
  weight is drawn once and reused by every plan, so plans differ only in where noise is.

The target is delta NLL = ln(ppl_q / ppl_base) = ln(1 + delta_ppl). The predictor is one
linear least-squares fit of ln(delta NLL) on a few terms, each a feature or its logarithm
(``"log(fisher)"``, ``"nll_base"``): a power law in the features, explainable by its
coefficients. It predicts delta_ppl = exp(exp(fit)) - 1.

    rows = mpqc.studies.predict.collect(graph, search_tokens, holdout, model="smollm2", n_plans=40)
    predictor = mpqc.studies.predict.Predictor.fit(rows, terms=mpqc.studies.predict.DEFAULT_TERMS)
    predictor.predict(rows)                                   # delta_ppl per row
    mpqc.studies.predict.validate(rows, by="plans")                   # held-out plans: R^2, MAE, Spearman
    mpqc.studies.predict.validate(rows_of_several_models, by="models")  # leave one model out
    mpqc.studies.predict.leave_one_size_out(rows_of_several_sizes)      # each size's Q_r curve and
                                                                        # Q_r,max per budget, from the others
    mpqc.studies.predict.write_data("data.csv", rows); mpqc.studies.predict.read_data("data.csv")
    predictor.save("predictor.json"); mpqc.studies.predict.Predictor.load("predictor.json")

The modules:

    mpqc.studies.predict.features     Features: the measurements of one model, any plan's features
    mpqc.studies.predict.dataset      collect(), sample_plans(), write_data(), read_data(): the rows
    mpqc.studies.predict.model        Predictor, parse_term(), DEFAULT_TERMS: the fit
    mpqc.studies.predict.validation   metrics(), validate(), leave_one_size_out(): how well it predicts
                                      held-out plans, models and sizes (their Q_r,max per budget)
"""

from __future__ import annotations

# Every name below stays reachable as mpqc.studies.predict.<name>.
from mpqc.studies.predict.dataset import COLUMNS, collect, read_data, sample_plans, write_data  # noqa: F401
from mpqc.studies.predict.features import FEATURES, MODEL_FEATURES, PLAN_FEATURES, Features, fisher_gradients  # noqa: F401
from mpqc.studies.predict.model import DEFAULT_TERMS, LOG_FLOOR, Predictor, design, parse_term  # noqa: F401
from mpqc.studies.predict.validation import (  # noqa: F401
    SIMILAR_RATIO,
    leave_one_size_out,
    metrics,
    ratio_curves,
    validate,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_TERMS",
    "FEATURES",
    "Features",
    "Predictor",
    "collect",
    "fisher_gradients",
    "leave_one_size_out",
    "metrics",
    "read_data",
    "validate",
    "write_data",
]
