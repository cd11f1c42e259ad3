"""A plan: which precision each component of a captured graph runs at. Plain data.

    plan = mpqc.Plan.uniform(graph, "mxint4", granularity="matmul")
    plan = mpqc.Plan(graph, {"layers.0.mlp.down_proj": "bf16"}, default="mxint4")
    plan.quantization_ratio(by="params"); plan.average_bits(); plan.to_json()
    plan = mpqc.Plan(graph, {...}, default="bf16", keep_high=("lm_head",))  # Q_r without the lm_head

A precision is a weight format and an activation format. One name stands for both; a pair
(weight, activation) or a dict {"weight": ..., "activation": ...} sets them apart; an
activation of None leaves activations as they are. ``activations=False`` keeps activations
at the plan's high format for every shorthand name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping, Sequence

from mpqc import fingerprint
from mpqc.formats import Format, get_format
from mpqc.formats.spec import validate_block_size
from mpqc.graph import ROLES, Component, Granularity, Graph, Matmul
from mpqc.targets import check_target, llamacpp_activation

PLAN_SCHEMA_VERSION = 1
PLAN_KEYS = ("mpqc_plan", "granularity", "default")  # what every plan file holds (and "components")
SUMMARY_TOLERANCE = 1e-9  # a stored Q_r further than this from the recomputed one is refused
Q_R_ALL = "params of all matmuls"  # the definition of Q_r when nothing is kept high (and before keep_high)


def q_r_definition(keep_high: Sequence[str] = ()) -> str:
    """The words that say which parameters Q_r counts (results, plan summaries, reports)."""
    if not keep_high:
        return Q_R_ALL
    return "params of matmuls excluding kept-high: " + ", ".join(keep_high)


def keep_high_entries(keep_high) -> tuple[str, ...]:
    """``keep_high`` as a tuple of names: a sequence of component names or roles, not one string."""
    if isinstance(keep_high, str) or not all(isinstance(k, str) and k for k in keep_high):
        raise TypeError(f"keep_high is a list of component names or roles such as ['lm_head'], got {keep_high!r}")
    return tuple(keep_high)


def resolve_keep_high(graph: Graph, granularity: Granularity, keep_high: Sequence[str]) -> tuple[str, ...]:
    """The component names ``keep_high`` stands for at ``granularity``: each entry a component
    name, or else a role (``mpqc.graph.ROLES``) naming every component whose matmuls all have it."""
    keep_high = keep_high_entries(keep_high)
    if not keep_high:
        return ()
    components = graph.components(granularity)
    names = [c.name for c in components]
    resolved: list[str] = []
    for entry in keep_high:
        if entry in names:
            found = [entry]
        elif entry in ROLES:
            found = [c.name for c in components if all(m.role == entry for m in c.matmuls)]
            if not found:
                raise ValueError(
                    f"keep_high role {entry!r} is no whole component at this granularity of {graph.model_class}: "
                    "no component has only matmuls of that role; name components instead, or use the matmul granularity"
                )
        else:
            close = difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
            raise ValueError(
                f"keep_high names {entry!r}, which is neither a component of this granularity of "
                f"{graph.model_class}{' (closest: ' + ', '.join(close) + ')' if close else ''} nor a role "
                f"({', '.join(ROLES)})"
            )
        resolved += [n for n in found if n not in resolved]
    return tuple(resolved)


@dataclasses.dataclass(frozen=True)
class Precision:
    """The formats one component runs at: its weights, and the activations entering its matmuls."""

    weight: Format
    activation: Format | None

    @classmethod
    def parse(cls, spec, *, activations: bool = True, high: str = "bf16") -> Precision:
        if isinstance(spec, Precision):
            return spec
        if isinstance(spec, (str, Format)):
            fmt = get_format(spec)
            return cls(fmt, fmt if activations else get_format(high))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"weight", "activation"}
            if unknown or "weight" not in spec:
                raise ValueError(f"a precision dict has keys 'weight' and optionally 'activation', got {sorted(spec)}")
            act = spec.get("activation", spec["weight"] if activations else high)
            return cls(get_format(spec["weight"]), None if act is None else get_format(act))
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return cls(get_format(spec[0]), None if spec[1] is None else get_format(spec[1]))
        raise TypeError(
            f"a precision is a format name, a (weight, activation) pair or a dict with 'weight'/'activation', got {spec!r}"
        )

    @property
    def is_low(self) -> bool:
        """The weights are stored narrower than 16 bits."""
        return self.weight.is_low_precision

    def to_dict(self) -> dict:
        for fmt in (self.weight, self.activation):
            if fmt is not None and get_format(fmt.name) != fmt:
                raise ValueError(f"format {fmt.name!r} is not a preset and cannot be written to JSON")
        return {"weight": self.weight.name, "activation": None if self.activation is None else self.activation.name}

    def __str__(self) -> str:
        act = "-" if self.activation is None else self.activation.name
        return self.weight.name if act == self.weight.name else f"W:{self.weight.name}/A:{act}"


class Plan:
    """Component name -> Precision, a default for the rest, a granularity, a block size and rounding.

    ``target="llama.cpp"`` scores the plan as llama.cpp runs it: each matmul's activations are
    what llama.cpp's CPU kernels turn them into for its weight type (``mpqc.targets``), whatever
    the precisions' activation formats say; weights must then have GGUF types."""

    def __init__(
        self,
        graph: Graph,
        assignments: Mapping | None = None,
        *,
        default="bf16",
        granularity: Granularity = "matmul",
        activations: bool = True,
        block_size=None,
        rounding: str = "nearest",
        high: str = "bf16",
        target: str | None = None,
        keep_high: Sequence[str] = (),
    ):
        self.graph = graph
        self.target = check_target(target)
        self.granularity = granularity
        self.components: tuple[Component, ...] = graph.components(granularity)
        self._component_of = {m.name: c.name for c in self.components for m in c.matmuls}
        names = [c.name for c in self.components]
        self.default = Precision.parse(default, activations=activations, high=high)
        self.assignments: dict[str, Precision] = {}
        known = set(names)
        for name, spec in (assignments or {}).items():
            if name not in known:
                close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
                hint = (
                    f"; closest: {', '.join(close)}"
                    if close
                    else f"; there are {len(names)} components, e.g. {', '.join(names[:3])}"
                )
                raise KeyError(
                    f"plan names component {name!r}, which the {self.granularity_label} granularity of "
                    f"{graph.model_class} does not have{hint}"
                )
            self.assignments[name] = Precision.parse(spec, activations=activations, high=high)
        if block_size is not None:
            validate_block_size(block_size, what="plan block_size")
        self.block_size = block_size
        if rounding not in ("nearest", "even"):
            raise ValueError(f"unknown rounding mode {rounding!r}; valid modes: nearest, even")
        self.rounding = rounding
        for p in {self.default, *self.assignments.values()}:  # reject block sizes a format cannot take
            for fmt in (p.weight, p.activation):
                if fmt is not None and fmt.family != "cast":
                    fmt.with_block(block_size)
        if self.target is not None:
            for m in graph.matmuls:  # raises for a weight format llama.cpp cannot run
                self.activation_format(m)
        self._set_keep_high(keep_high)

    def _set_keep_high(self, keep_high: Sequence[str]) -> None:
        """Components at the default (the high precision) and outside Q_r, numerator and denominator."""
        self.keep_high: tuple[str, ...] = keep_high_entries(keep_high)
        self.kept_high: tuple[str, ...] = resolve_keep_high(self.graph, self.granularity, self.keep_high)
        assigned = sorted(n for n in self.kept_high if n in self.assignments and self.assignments[n] != self.default)
        if assigned:
            raise ValueError(
                f"components {assigned} are kept high (keep_high={list(self.keep_high)}) but assigned another "
                f"precision than the plan's default {self.default}; a kept-high component stays at the default"
            )
        kept = set(self.kept_high)
        self._counted = tuple(m for c in self.components if c.name not in kept for m in c.matmuls)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def uniform(cls, graph: Graph, fmt, *, granularity: Granularity = "matmul", activations: bool = True, **kw) -> Plan:
        """Every component at ``fmt`` (activations too, unless ``activations=False``); with
        ``keep_high``, every other component, the kept-high ones at ``high`` (bf16 by default)."""
        kept = resolve_keep_high(graph, granularity, kw.get("keep_high", ()))
        if not kept:
            return cls(graph, {}, default=fmt, granularity=granularity, activations=activations, **kw)
        others = {c.name: fmt for c in graph.components(granularity) if c.name not in kept}
        return cls(
            graph, others, default=kw.get("high", "bf16"), granularity=granularity, activations=activations, **kw
        )

    def replace(self, assignments: Mapping) -> Plan:
        """A plan like this one with these components reassigned."""
        merged = {**self.assignments, **assignments}
        return Plan(
            self.graph,
            merged,
            default=self.default,
            granularity=self.granularity,
            block_size=self.block_size,
            rounding=self.rounding,
            target=self.target,
            keep_high=self.keep_high,
        )

    @property
    def granularity_label(self) -> str:
        g = self.granularity
        return g if isinstance(g, str) else f"custom:{getattr(g, '__name__', type(g).__name__)}"

    # ---- lookup ------------------------------------------------------------------------------
    def precision(self, component: str) -> Precision:
        return self.assignments.get(component, self.default)

    def precision_of(self, matmul: Matmul | str) -> Precision:
        name = matmul.name if isinstance(matmul, Matmul) else matmul
        return self.precision(self._component_of[name])

    def weight_format(self, matmul: Matmul) -> Format:
        fmt = self.precision_of(matmul).weight
        return fmt if fmt.family == "cast" else fmt.with_block(self.block_size)

    def activation_format(self, matmul: Matmul) -> Format | None:
        if self.target is not None:
            return llamacpp_activation(self.weight_format(matmul) if matmul.has_weight else None)
        fmt = self.precision_of(matmul).activation
        return fmt if fmt is None or fmt.family == "cast" else fmt.with_block(self.block_size)

    # ---- accounting --------------------------------------------------------------------------
    def _is_low(self, m: Matmul) -> bool:
        # A weight matmul is low when its weights are; an activation-only matmul when its inputs are.
        if m.has_weight:
            return self.precision_of(m).is_low
        act = self.precision_of(m).activation
        return act is not None and act.is_low_precision

    def quantization_ratio(self, by: str = "params") -> float:
        """Q_r: low-precision parameters over all matmul parameters (by="params", the paper's
        definition), or low-precision multiply-accumulates over all (by="macs"). Components kept
        high (``keep_high``) are left out of both counts: Q_r is then the share of the searchable
        matmuls that is low (``q_r_definition`` says which)."""
        if by not in ("params", "macs"):
            raise ValueError(f"quantization_ratio(by=...) takes 'params' or 'macs', got {by!r}")
        size = (lambda m: m.params) if by == "params" else (lambda m: m.macs_per_token)
        total = sum(size(m) for m in self._counted)
        low = sum(size(m) for m in self._counted if self._is_low(m))
        return low / total if total else 0.0

    @property
    def q_r_definition(self) -> str:
        """Which parameters Q_r counts: "params of all matmuls", or all but the kept-high ones."""
        return q_r_definition(self.keep_high)

    def weight_bits(self) -> int:
        """Exact bits to store every matmul weight (each once): codes, block and tensor scales."""
        bits = 0
        for m in self.graph.matmuls:
            if m.has_weight and m.params:
                bits += self.weight_format(m).storage_bits(m.weight_shape, axis=m.weight_reduction_axis)
        return bits

    def average_bits(self) -> float:
        """Average bits per matmul weight, scale overhead included."""
        return self.weight_bits() / self.graph.total_params

    def elements_per_scale(self) -> float:
        """Average weight elements per shared scale over the low-precision weights: their elements
        over their scales. Where Law 2 places per-vector and per-tensor blocks on the block-size
        axis (Cao et al.: their average element count). NaN when no low weight has a scale."""
        elements = scales = 0
        for m in self.graph.matmuls:
            if m.has_weight and m.params and self.precision_of(m).is_low:
                fmt = self.weight_format(m)
                n = fmt.n_blocks(m.weight_shape, axis=m.weight_reduction_axis)
                if n:
                    elements, scales = elements + m.params, scales + n
        return elements / scales if scales else math.nan

    def summary(self) -> dict:
        return {
            "quantization_ratio_params": self.quantization_ratio("params"),
            "quantization_ratio_macs": self.quantization_ratio("macs"),
            "average_bits": self.average_bits(),
            "q_r_definition": self.q_r_definition,
        }

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "mpqc_plan": PLAN_SCHEMA_VERSION,
            "model_class": self.graph.model_class,
            "model": model_identity(self.graph),
            "granularity": self.granularity_label,
            "block_size": self.block_size,
            "rounding": self.rounding,
            **({"target": self.target} if self.target is not None else {}),
            **({"keep_high": list(self.keep_high)} if self.keep_high else {}),
            "default": self.default.to_dict(),
            "components": {name: p.to_dict() for name, p in self.assignments.items()},
            "summary": self.summary(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, graph: Graph, data: Mapping, *, granularity: Granularity | None = None) -> Plan:
        """The plan ``data`` describes, on ``graph``; refused when it was made for another model
        (``data["model"]``) or when its stored summary (Q_r) differs from the recomputed one."""
        _check_plan_data(data)
        stored = data["granularity"]
        if granularity is None:
            if stored.startswith("custom:"):
                raise ValueError(f"the plan was made at granularity {stored!r}; pass granularity= the same callable")
            granularity = stored
        _check_model(graph, data)
        plan = cls(
            graph,
            data.get("components", {}),
            default=data["default"],
            granularity=granularity,
            block_size=data.get("block_size"),
            rounding=data.get("rounding", "nearest"),
            target=data.get("target"),
            keep_high=data.get("keep_high", ()),
        )
        _check_summary(plan, data.get("summary"))
        return plan

    @classmethod
    def from_json(cls, graph: Graph, text: str, *, granularity: Granularity | None = None) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"a plan is JSON, and this text is not: {e}") from None
        return cls.from_dict(graph, data, granularity=granularity)

    @classmethod
    def from_file(cls, graph: Graph, path, *, granularity: Granularity | None = None) -> Plan:
        """The plan in the JSON file ``path``; every error names the file."""
        data = read_plan_file(path)
        try:
            return cls.from_dict(graph, data, granularity=granularity)
        except (ValueError, TypeError) as e:
            raise ValueError(f"plan file {path}: {e}") from None
        except KeyError as e:
            raise KeyError(f"plan file {path}: {e.args[0]}") from None

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Plan)
            and self.graph is other.graph
            and self.granularity_label == other.granularity_label
            and self.block_size == other.block_size
            and self.rounding == other.rounding
            and self.target == other.target
            and self.kept_high == other.kept_high
            and all(self.precision(c.name) == other.precision(c.name) for c in self.components)
        )

    def __repr__(self) -> str:
        return (
            f"Plan({self.graph.model_class}, {self.granularity_label}, default={self.default}, "
            f"assigned={len(self.assignments)}, Q_r={self.quantization_ratio():.3f}, "
            f"avg_bits={self.average_bits():.2f})"
        )


# ---- checks of a stored plan ----------------------------------------------------------------


def model_identity(graph: Graph) -> dict:
    """What a plan records of the model it was made for: its structure, not its weights, so a
    plan applies to every checkpoint of one architecture (and to any dtype or device)."""
    return {
        "class": graph.model_class,
        "matmuls": len(graph.matmuls),
        "matmul_params": graph.total_params,
        "structure": fingerprint.structure(graph),
    }


def read_plan_file(path) -> dict:
    """The JSON of a plan file, checked for the keys every plan has (no model needed); errors
    name the file and the missing or wrong key."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"plan file {path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"plan file {path}: not a text file (a plan is JSON from Plan.to_json)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path}: not valid JSON ({e})") from None
    try:
        _check_plan_data(data)
    except ValueError as e:
        raise ValueError(f"plan file {path}: {e}") from None
    return data


def _describe(model: Mapping) -> str:
    params = model.get("matmul_params")
    params = f"{params:,}" if isinstance(params, int) else "?"
    return f"{model.get('class')} with {model.get('matmuls')} matmuls ({params} matmul parameters)"


def _check_plan_data(data) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"a plan is a JSON object with keys {', '.join(PLAN_KEYS)} (as Plan.to_json writes it), "
            f"got {type(data).__name__ if data is not None else 'null'}"
        )
    version = data.get("mpqc_plan")
    if version != PLAN_SCHEMA_VERSION:
        raise ValueError(f"not an mpqc plan of schema version {PLAN_SCHEMA_VERSION} (mpqc_plan = {version!r})")
    missing = [k for k in PLAN_KEYS if k not in data]
    if missing:
        raise ValueError(f"the plan lacks key(s) {', '.join(map(repr, missing))}; a plan has {', '.join(PLAN_KEYS)}")
    if not isinstance(data["granularity"], str):
        raise ValueError(f"plan key 'granularity' is a name such as 'matmul', got {data['granularity']!r}")
    if not isinstance(data.get("components", {}), Mapping):
        raise ValueError(
            "plan key 'components' maps component names to precisions (a JSON object), "
            f"got {type(data['components']).__name__}"
        )
    for key in ("model", "summary"):
        if key in data and not isinstance(data[key], Mapping):
            raise ValueError(f"plan key {key!r} is a JSON object, got {type(data[key]).__name__}")


def _check_model(graph: Graph, data: Mapping) -> None:
    here = model_identity(graph)
    stored = data.get("model")
    if stored is None:  # plans written before plans carried the model: the class is all there is
        stored = {"class": data.get("model_class", here["class"])}
        if stored["class"] != here["class"]:
            raise ValueError(f"the plan was made for a {stored['class']}, this model is {_describe(here)}")
        return
    if stored.get("structure") != here["structure"] or stored.get("class") != here["class"]:
        raise ValueError(
            f"the plan was made for {_describe(stored)}, this model is {_describe(here)}: "
            "a plan applies only to the architecture it was made for; search or write one for this model"
        )


def _check_summary(plan: Plan, summary: Mapping | None) -> None:
    if not summary or "quantization_ratio_params" not in summary:
        return
    stated, actual = summary["quantization_ratio_params"], plan.quantization_ratio("params")
    if not isinstance(stated, (int, float)) or abs(stated - actual) > SUMMARY_TOLERANCE:
        raise ValueError(
            f"the plan states Q_r {stated!r} but gives Q_r {actual:.6f} on this model: it was made for another "
            "model, or edited without its summary; fix or drop its 'summary'"
        )
    stated = summary.get("q_r_definition", plan.q_r_definition)
    if stated != plan.q_r_definition:
        raise ValueError(
            f"the plan's summary defines Q_r as {stated!r} but its keep_high gives {plan.q_r_definition!r}; "
            "fix its 'keep_high' or drop its 'summary'"
        )
