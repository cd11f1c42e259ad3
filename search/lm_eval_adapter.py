"""lm-evaluation-harness on a compiled mpqc model: an ``lm_eval`` LM adapter and a search objective.

    lm = MpqcLM(qmodel, tokenizer)                     # an lm_eval.api.model.LM
    score = evaluate_task(qmodel, tokenizer, "mmlu", limit=100)   # or a task YAML path
    score.value, score.metric, score.higher_is_better
    mpqc.search.run(graph, tokens, ratio=0.9,
                    objective=LMEvalObjective(task="mmlu", tokenizer=tokenizer, limit=100))

``lm_eval`` is optional (``pip install lm_eval`` or ``pip install 'mpqc[lmeval]'``): this
module imports without it, and everything that needs it says so when called.

How the adapter scores, and why it never pads: a compiled model takes ``input_ids`` only (no
attention mask), and activation quantizers share one scale per block along the reduction
axis, which for the attention-values matmul is the key sequence; so padding tokens change
the quantized numbers of the real ones. Rows are therefore batched only with rows of the
same length, and every score equals the score of the sequence alone (up to float
reassociation in batched matmuls). Tokenization, left truncation to ``max_length`` and the
continuation slice follow lm-eval's own Hugging Face model (``HFLM``) and its ``TemplateLM``
base: context and continuation are encoded together and split, trailing spaces of the
context move to the continuation, an empty context becomes the BOS (else EOS) token.
Generation is greedy with no KV cache (a full forward per new token), which is what the
compiled graph supports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from typing import Any

# MpqcLM is loaded on first access (module __getattr__): it subclasses lm_eval's TemplateLM.
__all__ = ["INSTALL_HINT", "LMEvalObjective", "LMEvalScore", "MpqcLM", "evaluate_task", "require_lm_eval"]  # noqa: F822

INSTALL_HINT = "pip install lm_eval  (or: pip install 'mpqc[lmeval]')"
MIN_LM_EVAL = "0.4.10"  # 0.4.9.2 and earlier fail to import under transformers 5 (checked)
# Metrics where lower is better, for lm-eval versions that do not report a group's direction.
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def require_lm_eval():
    """Import ``lm_eval`` or raise an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ModuleNotFoundError(
            f"the lm-eval-harness objective needs the lm_eval package ({e}): {INSTALL_HINT}"
        ) from e
    try:
        import lm_eval.api.model  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.api.model import TemplateLM  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an old lm_eval fails with AttributeError on transformers 5
        version = getattr(lm_eval, "__version__", "unknown")
        raise ImportError(
            f"lm_eval {version} does not import here ({type(e).__name__}: {e}); mpqc needs "
            f"lm_eval>={MIN_LM_EVAL} (earlier releases use classes transformers 5 removed): "
            f"pip install -U 'lm_eval>={MIN_LM_EVAL}'"
        ) from e
    return lm_eval


# ---- the LM adapter ----------------------------------------------------------------------------


def __getattr__(name: str):
    # MpqcLM subclasses lm_eval's TemplateLM, so it exists only once lm_eval is importable.
    if name == "MpqcLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lm_class():
    require_lm_eval()
    from .lm_eval_lm import MpqcLM

    return MpqcLM


# ---- tasks ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMEvalScore:
    """One metric of one lm-eval task: ``value`` as lm-eval reports it, and its direction."""

    task: str
    metric: str  # lm-eval's key, "metric,filter" (e.g. "acc,none")
    value: float
    higher_is_better: bool
    results: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # lm-eval's "results"

    @property
    def loss(self) -> float:
        """What a search minimizes: -value where higher is better, else value; inf when not finite."""
        if not math.isfinite(self.value):
            return math.inf
        return -self.value if self.higher_is_better else self.value

    def __float__(self) -> float:
        return float(self.value)


class _YamlLoader:
    """A safe YAML loader that reads lm-eval task files, whose ``!function`` tags it ignores."""

    @staticmethod
    def load(path: str) -> dict:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
        with open(path) as f:
            data = yaml.load(f, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
        return data if isinstance(data, dict) else {}


def _is_yaml(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def resolve_task(task: str, include_path=None) -> tuple[str, list[str]]:
    """``(task name, include directories)`` for a registered name, a task YAML file, or a directory
    holding exactly one task YAML. A file's directory joins the include path."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be an lm-eval task name or the path of a task YAML, got {task!r}")
    if include_path is None:
        includes = []
    elif isinstance(include_path, (str, os.PathLike)):
        includes = [os.path.abspath(include_path)]
    else:
        includes = [os.path.abspath(p) for p in include_path]
    for p in includes:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"lm-eval include path {p!r} is not a directory")
    if os.path.isdir(task):
        found = {}
        for name in sorted(os.listdir(task)):
            if _is_yaml(name):
                cfg = _YamlLoader.load(os.path.join(task, name))
                if cfg.get("task") or cfg.get("group"):
                    found[name] = cfg.get("task") or cfg.get("group")
        if len(found) != 1:
            raise ValueError(
                f"{task!r} holds {len(found)} task YAMLs ({', '.join(map(str, found.values())) or 'none'}); "
                "pass one YAML file, or a task name with include_path set to the directory"
            )
        task = os.path.join(task, next(iter(found)))
    if _is_yaml(task) or os.path.isfile(task):
        if not os.path.isfile(task):
            raise FileNotFoundError(f"lm-eval task file {task!r} does not exist")
        cfg = _YamlLoader.load(task)
        name = cfg.get("task") or cfg.get("group")
        if not isinstance(name, str):
            raise ValueError(f"{task!r} is not an lm-eval task YAML: it has no `task:` (or `group:`) name")
        return name, [os.path.dirname(os.path.abspath(task)), *includes]
    return task, includes


@functools.lru_cache(maxsize=8)
def _task_manager(includes: tuple[str, ...], defaults: bool):
    # Built once per include path: a search evaluates the same task every trial, and indexing
    # lm-eval's built-in tasks costs seconds. The index only maps names to configs.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(includes) or None, include_defaults=defaults)


def _manager_for(name: str, includes: list[str]):
    # Indexing lm-eval's ~15k built-in tasks costs seconds: a task found in the user's own
    # directories is loaded from an index of those alone.
    if includes:
        own = _task_manager(tuple(includes), False)
        if name in own.all_tasks:
            return own
    manager = _task_manager(tuple(includes), True)
    if name not in manager.all_tasks:
        close = [t for t in manager.all_tasks if name.lower() in t.lower()][:8]
        raise ValueError(
            f"lm-eval has no task {name!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
            + ("" if includes else "; for a custom task pass its YAML or include_path")
        )
    return manager


def _pick_metric(results: dict, task: str, metric: str | None) -> tuple[str, float]:
    if task not in results:
        if len(results) != 1:
            raise ValueError(f"lm-eval returned no results for {task!r} (it has {sorted(results)})")
        task = next(iter(results))
    entry = results[task]
    keys = [
        k
        for k, v in entry.items()
        if k != "alias"
        and "_stderr" not in k
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("samples", "sample_len")
    ]
    if metric is None:
        if not keys:
            raise ValueError(f"lm-eval reported no metric for {task!r}: {entry}")
        key = keys[0]
    elif metric in keys:
        key = metric
    else:
        matching = [k for k in keys if k.split(",")[0] == metric]
        if len(matching) != 1:
            what = "several filters give it" if matching else "no such metric"
            raise ValueError(f"metric {metric!r} of task {task!r}: {what}; the task reports {keys}")
        key = matching[0]
    return key, float(entry[key])


def _higher_is_better(raw: dict, task: str, key: str) -> bool:
    base = key.split(",")[0]
    table = raw.get("higher_is_better", {})
    direction = table.get(task, {}).get(base) if task in table else None
    if direction is None and len(table) == 1:
        direction = next(iter(table.values())).get(base)
    return (base not in _LOWER_IS_BETTER) if direction is None else bool(direction)


def evaluate_task(
    model,
    tokenizer,
    task: str,
    *,
    metric: str | None = None,
    limit: int | float | None = None,
    include_path=None,
    num_fewshot: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    lm=None,
    quiet: bool = True,
) -> LMEvalScore:
    """Evaluate ``model`` on one lm-eval task (or group) and return one metric.

    ``task``: a registered name ("mmlu", "hellaswag", ...), the path of a task YAML (its
    directory joins the include path), or a directory holding one. ``metric``: "acc",
    "acc_norm", "acc,none", ... (default: the first the task reports). ``limit``: the first
    ``limit`` documents of each task (a fraction if below 1), for a fast search objective.
    ``seed`` seeds Python, NumPy, torch and the few-shot sampler as ``simple_evaluate`` does.
    ``lm``: a ready :class:`MpqcLM` to use instead of wrapping ``model`` and ``tokenizer``.
    ``bootstrap_iters=0`` skips lm-eval's bootstrap standard errors (100000 resamples by default).
    """
    require_lm_eval()
    from lm_eval import evaluator

    name, includes = resolve_task(task, include_path)
    if lm is None:
        if tokenizer is None:
            raise ValueError("evaluate_task needs the model's tokenizer (or a ready lm=MpqcLM(...))")
        lm = _lm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length)
    manager = _manager_for(name, includes)
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if quiet:  # lm-eval logs each task build and evaluation at INFO, some at WARNING
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    # lm-eval adds an environment report to its results (torch's collect_env, which runs `pip
    # list` and more: about a second per call); only the metrics are used here, so skip it.
    env_info = getattr(evaluator, "add_env_info", None)
    if env_info is not None:
        evaluator.add_env_info = lambda results: None
    try:
        raw = evaluator.simple_evaluate(
            model=lm,
            tasks=[name],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        if env_info is not None:
            evaluator.add_env_info = env_info
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    results = raw["results"]
    key, value = _pick_metric(results, name, metric)
    return LMEvalScore(
        task=name, metric=key, value=value, higher_is_better=_higher_is_better(raw, name, key), results=results
    )


# ---- the search objective ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMEvalObjective:
    """A search objective: an lm-eval task's metric on the compiled model, for ``mpqc.search.run``.

    Each trial switches the search's one compiled model to the trial's plan and evaluates the
    task on it (no recapture); the study minimizes :attr:`LMEvalScore.loss` (``-acc`` for an
    accuracy). Arguments as in :func:`evaluate_task`; ``tokenizer`` is the model's.
    """

    task: str
    tokenizer: Any = dataclasses.field(repr=False, compare=False)
    metric: str | None = None
    limit: int | float | None = None
    include_path: str | list | None = None
    num_fewshot: int | None = None
    seed: int = 0
    batch_size: int = 8
    max_length: int | None = None
    max_gen_toks: int = 256

    def __post_init__(self):
        require_lm_eval()
        if self.tokenizer is None:
            raise ValueError("LMEvalObjective needs the model's tokenizer")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or self.limit <= 0
        ):
            raise ValueError(
                f"limit must be a positive number of documents (or a fraction below 1), got {self.limit!r}"
            )
        resolve_task(self.task, self.include_path)  # fail now, not after the first trial

    @property
    def label(self) -> str:
        name, _ = resolve_task(self.task, self.include_path)
        return (
            f"lm-eval {name}"
            + (f" {self.metric}" if self.metric else "")
            + (f" (limit {self.limit})" if self.limit else "")
        )

    def config(self) -> dict:
        """What decides the numbers, JSON-ready: part of a stored study's fingerprint."""
        name, includes = resolve_task(self.task, self.include_path)
        files = {}
        for d in includes:  # a task defined in the user's files is fingerprinted by their content
            for f in sorted(os.listdir(d)):
                if _is_yaml(f):
                    with open(os.path.join(d, f), "rb") as fh:
                        files[f] = hashlib.sha256(fh.read()).hexdigest()[:16]
        tok = self.tokenizer
        return {
            "kind": "lm_eval",
            "task": name,
            "task_files": files,
            "metric": self.metric,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "seed": self.seed,
            "max_length": self.max_length,
            "max_gen_toks": self.max_gen_toks,
            "tokenizer": {
                "name": str(getattr(tok, "name_or_path", "")),
                "size": len(tok) if hasattr(tok, "__len__") else None,
            },
        }

    def lm(self, model):
        """The MpqcLM over ``model``, made once per model and reused across trials."""
        cached = getattr(self, "_lm", None)
        if cached is None or cached.model is not model:
            cached = _lm_class()(
                model,
                self.tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
                max_gen_toks=self.max_gen_toks,
            )
            object.__setattr__(self, "_lm", cached)
        return cached

    def evaluate(self, model) -> LMEvalScore:
        return evaluate_task(
            model,
            self.tokenizer,
            self.task,
            metric=self.metric,
            limit=self.limit,
            include_path=self.include_path,
            num_fewshot=self.num_fewshot,
            seed=self.seed,
            lm=self.lm(model),
        )
