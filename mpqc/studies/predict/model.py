"""The predictor: ln(delta NLL) fitted by least squares on a few terms (features or their logs)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mpqc.io import json_safe, write_json_atomic
from mpqc.studies.predict.features import FEATURES

__all__ = ["DEFAULT_TERMS", "LOG_FLOOR", "Predictor", "design", "parse_term"]

# Chosen on the measurements in docs/scaling.md ("Prediction"): the summed per-component Fisher
# estimate alone ranks plans best, needs no forward per plan, and carries over between models best;
# Q_r, the noise probe and the model-level factors add little within a model and extrapolate badly.
DEFAULT_TERMS = ("log(fisher_diag)",)
LOG_FLOOR = 1e-6  # log(x) of a feature or target below this (noise: a loss change <= 0) uses this
_TERM = re.compile(r"^(log\()?([a-z_]+)(\))?$")


def parse_term(term: str) -> tuple[bool, str]:
    m = _TERM.match(term.strip())
    if not m or bool(m.group(1)) != bool(m.group(3)):
        raise ValueError(f"a term is a feature name or log(name), e.g. 'log(fisher)' or 'nll_base'; got {term!r}")
    return bool(m.group(1)), m.group(2)


def design(rows: Sequence[Mapping], terms: Sequence[str]) -> np.ndarray:
    """The regression's columns: each term's value per row (log terms floored at LOG_FLOOR)."""
    cols = []
    for term in terms:
        is_log, name = parse_term(term)
        values = []
        for i, r in enumerate(rows):
            if name not in r:
                raise ValueError(
                    f"term {term!r} needs feature {name!r}, which row {i} lacks; "
                    f"features: {', '.join(k for k in r if k in FEATURES) or 'none'}"
                )
            v = float(r[name])
            if not math.isfinite(v):
                raise ValueError(
                    f"term {term!r}: feature {name!r} of row {i} (model {r.get('model')!r}, plan "
                    f"{r.get('plan_id')!r}) is {v}; was it measured (e.g. noise_rise needs probe windows)?"
                )
            values.append(math.log(max(v, LOG_FLOOR)) if is_log else v)
        cols.append(values)
    return np.asarray(cols, dtype=float).T.reshape(len(rows), len(terms))


def _target(rows: Sequence[Mapping]) -> np.ndarray:
    y = []
    for i, r in enumerate(rows):
        d = float(r["delta_ppl"])
        if not math.isfinite(d) or d <= -1:
            raise ValueError(f"row {i}: delta_ppl {d} is not a finite number above -1")
        y.append(math.log1p(d))
    return np.asarray(y)


@dataclasses.dataclass(frozen=True)
class Predictor:
    """ln(delta NLL) = intercept + sum_i coef_i * term_i; delta_ppl = exp(delta NLL) - 1.

    ``unused``: terms that were constant in the training data (e.g. model-level features when
    fitting one model); they get coefficient 0. ``setup``: how the features were measured
    (``mpqc predict plan`` measures new plans the same way)."""

    terms: tuple[str, ...]
    intercept: float
    coef: tuple[float, ...]
    coef_err: tuple[float, ...]
    intercept_err: float
    unused: tuple[str, ...] = ()
    n: int = 0
    dropped: int = 0  # training rows with delta NLL <= LOG_FLOOR (no logarithm), left out of the fit
    r2_log: float = math.nan  # in-sample, of ln(delta NLL)
    residual_std: float = math.nan
    models: tuple[str, ...] = ()
    setup: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def fit(
        cls, rows: Sequence[Mapping], terms: Sequence[str] = DEFAULT_TERMS, *, setup: Mapping | None = None
    ) -> Predictor:
        terms = tuple(terms)
        if not terms:
            raise ValueError("give at least one term, e.g. 'log(fisher)'")
        for t in terms:
            parse_term(t)
        if len(set(terms)) != len(terms):
            raise ValueError(f"terms repeat: {list(terms)}")
        rows = list(rows)
        dnll = _target(rows)
        keep = dnll > LOG_FLOOR
        x, y = design(rows, terms)[keep], np.log(dnll[keep])
        used = [
            j for j in range(len(terms)) if x.shape[0] and np.ptp(x[:, j]) > 1e-12 * max(1.0, np.abs(x[:, j]).max())
        ]
        p = len(used) + 1
        if x.shape[0] < p + 2:
            raise ValueError(
                f"{x.shape[0]} usable rows (delta NLL > {LOG_FLOOR:g}) for {p} coefficients; "
                f"need at least {p + 2}: collect more plans or use fewer terms"
            )
        a = np.column_stack([np.ones(x.shape[0]), x[:, used]])
        beta, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ beta
        dof = x.shape[0] - p
        s2 = float(resid @ resid) / dof
        try:
            cov = s2 * np.linalg.inv(a.T @ a)
            err = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            err = np.full(p, math.nan)
        coef, coef_err = [0.0] * len(terms), [math.nan] * len(terms)
        for k, j in enumerate(used):
            coef[j], coef_err[j] = float(beta[k + 1]), float(err[k + 1])
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return cls(
            terms=terms,
            intercept=float(beta[0]),
            coef=tuple(coef),
            coef_err=tuple(coef_err),
            intercept_err=float(err[0]),
            unused=tuple(terms[j] for j in range(len(terms)) if j not in used),
            n=int(keep.sum()),
            dropped=int((~keep).sum()),
            r2_log=1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan,
            residual_std=math.sqrt(s2),
            models=tuple(sorted({str(r.get("model", "")) for r in rows})),
            setup=dict(setup or {}),
        )

    def predict_log_dnll(self, rows: Sequence[Mapping]) -> np.ndarray:
        return self.intercept + design(list(rows), self.terms) @ np.asarray(self.coef)

    def predict(self, rows: Sequence[Mapping]) -> np.ndarray:
        """Predicted delta_ppl per row."""
        return np.expm1(np.exp(np.minimum(self.predict_log_dnll(rows), math.log(700.0))))

    def describe(self) -> str:
        lines = [f"ln(delta NLL) = {self.intercept:+.4f} (± {self.intercept_err:.4f})"]
        for t, c, e in zip(self.terms, self.coef, self.coef_err):
            lines.append(
                f"    {c:+.4f} (± {e:.4f}) * {t}" + ("   [constant in the data: not used]" if t in self.unused else "")
            )
        lines.append(
            f"fitted on {self.n} plans of {len(self.models)} model(s)"
            + (f" ({self.dropped} with delta NLL <= {LOG_FLOOR:g} left out)" if self.dropped else "")
            + f"; in-sample R^2 of ln(delta NLL) {self.r2_log:.3f}, residual std {self.residual_std:.3f}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        return {"mpqc_predictor": 1, **json_safe(d)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Predictor:
        if data.get("mpqc_predictor") != 1:
            raise ValueError(
                f"not an mpqc predictor of schema version 1 (mpqc_predictor = {data.get('mpqc_predictor')!r})"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = {"terms", "intercept", "coef"} - set(data)
        if missing:
            raise ValueError(f"predictor lacks {sorted(missing)}")
        kw = {k: v for k, v in data.items() if k in fields}
        for k in ("terms", "coef", "coef_err", "unused", "models"):
            if k in kw:
                kw[k] = tuple(math.nan if v is None else v for v in kw[k])
        for k in ("intercept_err", "r2_log", "residual_std"):
            if kw.get(k) is None and k in kw:
                kw[k] = math.nan
        if len(kw["terms"]) != len(kw["coef"]):
            raise ValueError(f"predictor has {len(kw['terms'])} terms but {len(kw['coef'])} coefficients")
        for t in kw["terms"]:
            parse_term(t)
        return cls(**kw)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> Predictor:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"predictor file {path} is not JSON: {e}") from e
        return cls.from_dict(data)
