"""Scaling-law sweeps: one search per cell of models x granularities x Q_r x formats x block sizes x seeds.

    config = mpqc.studies.sweep.load_config("examples/sweep_small.toml")
    summary = mpqc.studies.sweep.run(config)          # also: mpqc sweep CONFIG.toml
    rows = mpqc.studies.sweep.read_results(config.out)

Every cell is keyed by a hash of everything that decides its numbers (model, cell, search and
evaluation settings). Finished cells are rows of one tidy CSV, rewritten atomically after each
cell, so a killed sweep started again skips them; a model whose cells are all done is not even
loaded. Each model is loaded, captured and compiled once, and its unquantized (all-high)
perplexity on held-out text is measured once; every cell reuses the compiled model
(``set_plan``) and the same held-out windows. The schema is in docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib joined the standard library in 3.11; tomli is the same parser
    import tomli as tomllib

from mpqc.io import json_safe, read_csv, typed_rows, write_csv_atomic
from mpqc.models import parameter_counts
from mpqc.plan import Q_R_ALL, keep_high_entries

__all__ = [
    "COLUMNS",
    "Cell",
    "ModelEntry",
    "SweepConfig",
    "cell_states",
    "config_from_dict",
    "finished_keys",
    "load_config",
    "paper_setting",
    "read_results",
    "run",
]

COLUMNS = (
    "model",
    "params",
    "params_non_embedding",
    "matmul_params",
    "granularity",
    "ratio",
    "low",
    "high",
    "weights_only",
    "block_size",
    "block_elements",
    "seed",
    "train_seed",
    "ppl_base",
    "ppl_q",
    "delta_ppl",
    "window_nll_base",
    "window_nll_q",
    "achieved",
    "q_r_definition",
    "average_bits",
    "total_bits",
    "search_ppl",
    "trials",
    "sampler",
    "seq_len",
    "n_samples",
    "eval_samples",
    "seconds",
    "notes",
    "key",
)
# Columns added after results files were first written -> what a file without them meant.
_LEGACY_COLUMNS = {
    "q_r_definition": Q_R_ALL,  # before keep_high, Q_r counted every matmul
    "block_elements": "",  # not measured: Law 2 then leaves per-vector/per-tensor rows out
    "train_seed": "",  # not recorded: mpqc fit clusters the slope test by search seed alone
    "params_non_embedding": "",  # not recorded: mpqc fit --size non_embedding refuses the file
    "window_nll_base": "",  # not recorded: the slope test resamples seeds, not evaluation windows
    "window_nll_q": "",
}
_FLOAT = {
    "block_elements",
    "ratio",
    "ppl_base",
    "ppl_q",
    "delta_ppl",
    "achieved",
    "average_bits",
    "search_ppl",
    "seconds",
}
_INT = {
    "params",
    "params_non_embedding",
    "matmul_params",
    "seed",
    "train_seed",
    "total_bits",
    "trials",
    "seq_len",
    "n_samples",
    "eval_samples",
}

_WINDOW_NLLS = ("window_nll_base", "window_nll_q")  # mean NLL per held-out window, space-separated

_TOP_KEYS = {"out", "text", "models", "grid", "search", "eval"}
_GRID_DEFAULTS = {
    "granularity": ["matmul"],
    "ratio": None,
    "formats": [{"low": "mxint4"}],
    "block_size": ["default"],
    "seed": [0],
}
_SEARCH_DEFAULTS = {
    "sampler": "sensitivity",
    "n_trials": 12,
    "seq_len": 128,
    "n_samples": 8,
    "batch_size": 8,
    "high": "bf16",
    "storage": "",
    "device": "cpu",
    "dtype": "float32",
    # Components or roles kept high and left out of Q_r: by default the lm_head, so Q_r counts
    # the decoder layers as the paper's does (a tied lm_head is most of a small model's matmul
    # parameters); [] counts every matmul, as sweeps did before.
    "keep_high": ["lm_head"],
}
_EVAL_DEFAULTS = {"n_samples": 32, "seed": 1234}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str  # the label in the results
    spec: str  # as written in the config: a path (relative to the config) or a load_model spec
    path: str  # what load_model gets
    train_seed: int | None = None  # the seed the model was trained with, when the config says


@dataclasses.dataclass(frozen=True)
class Cell:
    model: ModelEntry
    granularity: str
    ratio: float
    low: str
    weights_only: bool
    block_size: int | str  # resolved: the low format's default when the config says "default"
    seed: int


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    out: str
    text: str
    models: tuple[ModelEntry, ...]
    granularities: tuple[str, ...]
    ratios: tuple[float, ...]
    formats: tuple[tuple[str, bool], ...]  # (low format, weights_only)
    block_sizes: tuple[object, ...]  # ints, "vector", "tensor" or "default"
    seeds: tuple[int, ...]
    search: dict
    eval: dict

    def cells(self) -> list[Cell]:
        """Every cell, model-major; duplicates (e.g. "default" and 32 for mxint4) appear once."""
        from mpqc.formats import get_format

        seen, cells = set(), []
        for m, g, (low, wo), bs, r, s in itertools.product(
            self.models, self.granularities, self.formats, self.block_sizes, self.ratios, self.seeds
        ):
            fmt = get_format(low)
            block = fmt.block_size if bs == "default" else fmt.with_block(bs).block_size
            cell = Cell(m, g, float(r), low, wo, block, s)
            if cell not in seen:
                seen.add(cell)
                cells.append(cell)
        return cells

    def key(self, cell: Cell) -> str:
        """A hash of everything that decides the cell's numbers."""
        model = [cell.model.name, cell.model.spec]
        data = {
            # a training seed joins the key only when given, so keys made before it stay
            "model": model if cell.model.train_seed is None else [*model, cell.model.train_seed],
            "text": self.text,
            **{f: getattr(cell, f) for f in ("granularity", "ratio", "low", "weights_only", "block_size", "seed")},
            # device does not decide the numbers; dtype and keep_high do, and join the key when not
            # what sweeps made before them did (float32, nothing kept high), so those keys stay.
            "search": {
                k: v
                for k, v in self.search.items()
                if k not in ("batch_size", "storage", "device")
                and not (k == "dtype" and v == "float32")
                and not (k == "keep_high" and not v)
            },
            "eval": self.eval,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---- config -------------------------------------------------------------------------------------


def load_config(path: str) -> SweepConfig:
    """Read and validate a sweep TOML file; paths in it are relative to its folder."""
    return config_from_dict(
        read_toml(path, "sweep config"), base_dir=os.path.dirname(os.path.abspath(path)), where=path
    )


def read_toml(path: str, what: str) -> dict:
    """A study config file's table; invalid TOML is a ValueError naming ``what`` and the file."""
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{what} {path}: not valid TOML: {e}") from e


def config_from_dict(data: dict, *, base_dir: str = ".", where: str = "sweep config") -> SweepConfig:
    from mpqc.formats import get_format
    from mpqc.formats.spec import validate_block_size

    _check_keys(data, _TOP_KEYS, where)
    for key in ("out", "models"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r} (see docs/scaling.md for the schema)")
    grid = _section(data, "grid", _GRID_DEFAULTS, where)
    search = _section(data, "search", _SEARCH_DEFAULTS, where)
    evaluation = _section(data, "eval", _EVAL_DEFAULTS, where)
    if grid["ratio"] is None:
        raise ValueError(f"{where}: [grid] needs ratio = [...], the Q_r values to search (e.g. [0.5, 0.7, 0.9])")

    models = tuple(_model_entry(m, base_dir, where) for m in _list(data["models"], "models", where))
    if len({m.name for m in models}) != len(models):
        raise ValueError(f"{where}: model names must be unique, got {[m.name for m in models]}")
    granularities = tuple(_list(grid["granularity"], "grid.granularity", where))
    for g in granularities:
        if g not in ("matmul", "layer"):
            raise ValueError(f"{where}: grid.granularity {g!r} is not 'matmul' or 'layer'")
    ratios = tuple(_list(grid["ratio"], "grid.ratio", where))
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"{where}: grid.ratio values are quantization ratios in (0, 1], got {r!r}")
    formats = []
    for f in _list(grid["formats"], "grid.formats", where):
        f = {"low": f} if isinstance(f, str) else f
        if not isinstance(f, dict) or "low" not in f or set(f) - {"low", "weights_only"}:
            raise ValueError(
                f"{where}: each grid.formats entry is a format name or {{ low = NAME, weights_only = BOOL }}, got {f!r}"
            )
        get_format(f["low"])  # unknown names fail here, listing the valid ones
        formats.append((f["low"], bool(f.get("weights_only", False))))
    block_sizes = tuple(_list(grid["block_size"], "grid.block_size", where))
    for bs in block_sizes:
        if bs != "default":
            validate_block_size(bs, what=f"{where}: grid.block_size")
            for low, _ in formats:
                get_format(low).with_block(bs)  # a block size a format cannot take fails now, not mid-sweep
    seeds = tuple(_list(grid["seed"], "grid.seed", where))
    for name, value in (
        ("search.n_trials", search["n_trials"]),
        ("search.seq_len", search["seq_len"]),
        ("search.n_samples", search["n_samples"]),
        ("search.batch_size", search["batch_size"]),
        ("eval.n_samples", evaluation["n_samples"]),
        *(("grid.seed", s) for s in seeds),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "grid.seed" else 1):
            raise ValueError(
                f"{where}: {name} must be a {'non-negative' if name == 'grid.seed' else 'positive'} "
                f"integer, got {value!r}"
            )
    if search["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{where}: search.dtype must be 'float32', 'bfloat16' or 'float16', got {search['dtype']!r}")
    if not isinstance(search["device"], str) or not search["device"]:
        raise ValueError(f"{where}: search.device must be 'cpu', 'cuda' or 'cuda:N', got {search['device']!r}")
    search["keep_high"] = _keep_high(search["keep_high"], where)
    if search["storage"] and "://" not in search["storage"]:  # a URL (PostgreSQL) as written, a path relative
        search["storage"] = _resolve(search["storage"], base_dir)
    return SweepConfig(
        out=_resolve(data["out"], base_dir),
        text=_text_spec(data.get("text", "wiki"), base_dir),
        models=models,
        granularities=granularities,
        ratios=ratios,
        formats=tuple(formats),
        block_sizes=block_sizes,
        seeds=seeds,
        search=search,
        eval=evaluation,
    )


def _keep_high(value, where: str) -> list[str]:
    """search.keep_high as a list of names (possibly empty: Q_r over every matmul)."""
    try:
        return list(keep_high_entries(value if isinstance(value, list) else [value]))
    except TypeError:
        raise ValueError(
            f'{where}: search.keep_high is a list of component names or roles, e.g. ["lm_head"] '
            f"([] counts every matmul in Q_r), got {value!r}"
        ) from None


PAPER_KEYS = ("sampler", "n_trials", "n_samples")  # what the paper's search setting changes in [search]


def paper_setting(config: SweepConfig) -> SweepConfig:
    """``config`` with the paper's search (Cao et al. 2024: random, 50 trials, 1024 sequences;
    ``mpqc sweep --paper``). The rest of a sweep's search runs as the paper's already (every
    trial on all its windows, the best trial as it is, every matmul a variable). The results go
    to ``<out>_paper.csv``: its cells are other cells (other keys), and rows of two search
    settings in one file would join one ratio curve in ``mpqc fit``."""
    from mpqc.search import PAPER_SETTING

    search = {**config.search, **{k: PAPER_SETTING[k] for k in PAPER_KEYS}}
    stem, ext = os.path.splitext(config.out)
    return dataclasses.replace(config, search=search, out=f"{stem}_paper{ext or '.csv'}")


def _check_keys(table: dict, valid, where: str, section: str = "") -> None:
    unknown = sorted(set(table) - set(valid))
    if unknown:
        label = f"[{section}] " if section else ""
        raise ValueError(f"{where}: unknown {label}key(s) {unknown}; valid: {sorted(valid)}")


def _section(data: dict, name: str, defaults: dict, where: str) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"{where}: {name} must be a table ([{name}]), got {type(table).__name__}")
    _check_keys(table, defaults, where, name)
    return {**defaults, **table}


def _list(value, name: str, where: str) -> list:
    value = value if isinstance(value, list) else [value]
    if not value:
        raise ValueError(f"{where}: {name} is empty; give at least one value")
    return value


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _text_spec(text: str, base_dir: str) -> str:
    # Named texts ("wiki", "hf:...") pass through; anything else is a path relative to the config.
    if text == "wiki" or text.startswith("hf:"):
        return text
    return _resolve(text, base_dir)


def _model_entry(entry, base_dir: str, where: str) -> ModelEntry:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "name", "train_seed"}:
        raise ValueError(
            f"{where}: each models entry is a path or {{ path = ..., name = ..., train_seed = INT }}, got {entry!r}"
        )
    train_seed = entry.get("train_seed")
    if train_seed is not None and (isinstance(train_seed, bool) or not isinstance(train_seed, int) or train_seed < 0):
        raise ValueError(
            f"{where}: a models entry's train_seed is the non-negative integer the model was trained with, "
            f"got {entry!r}"
        )
    spec = entry["path"]
    local = _resolve(spec, base_dir)
    # A path is relative to the config (it may not exist yet: trained later); anything else that
    # is not a file here (smollm2-135m, a cached hub id) goes to load_model as written.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf")
    path = local if os.path.exists(local) or looks_like_path else spec
    name = entry.get("name") or os.path.basename(os.path.normpath(spec))
    return ModelEntry(name=name, spec=spec, path=path, train_seed=train_seed)


# ---- results table ------------------------------------------------------------------------------


def _read_raw(path: str) -> list[dict]:
    """The rows of a results CSV; a file written before a column existed gets that column's
    old meaning (``_LEGACY_COLUMNS``), so old results stay readable and a sweep resumes on them."""
    if not os.path.exists(path):
        return []
    header, rows = read_csv(path)
    if tuple(header) != tuple(c for c in COLUMNS if c in header or c not in _LEGACY_COLUMNS):
        raise ValueError(
            f"results file {path} has columns {header}, not this sweep's {list(COLUMNS)}; point out = at a new file"
        )
    return [_complete(r) for r in rows]


def _complete(row: dict) -> dict:
    """``row`` with the columns it was written without, at their old meaning."""
    return {**{c: v for c, v in _LEGACY_COLUMNS.items() if c not in row}, **row}


def _write_raw(path: str, rows: list[dict]) -> None:
    write_csv_atomic(path, rows, COLUMNS)  # the old table or the whole new one, never half


def finished_keys(path: str) -> set[str]:
    """The keys of the cells already in a results CSV (none when it does not exist yet)."""
    return {r["key"] for r in _read_raw(path)}


def read_results(path: str) -> list[dict]:
    """The results CSV with typed values (floats, ints, bools; block_size an int or a word)."""
    kinds = {
        **{k: "float" for k in _FLOAT},
        **{k: "int" for k in _INT},
        **{k: "floats" for k in _WINDOW_NLLS},
        "weights_only": "bool",
        "block_size": "block",
    }
    rows = typed_rows(_read_raw(path), kinds, where=f"results file {path}")
    if not rows:
        raise ValueError(f"results file {path} is missing or has no rows; run `mpqc sweep CONFIG.toml` first")
    return rows


# ---- running ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepSummary:
    ran: int
    skipped: int
    out: str
    seconds: float


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(config: SweepConfig, *, progress: bool = True) -> SweepSummary:
    """Run every cell not yet in ``config.out``; returns how many ran and were skipped.

    With a ``storage`` in ``[search]``, workers on several machines share the sweep: each cell
    is claimed through the storage and run by one worker, and each writes the complete table
    (``_run_shared``)."""
    if config.search["storage"]:
        return _run_shared(config, progress)
    t_start = time.perf_counter()
    rows = _read_raw(config.out)
    done = {r["key"] for r in rows}
    cells = config.cells()
    pending = [c for c in cells if config.key(c) not in done]
    _log(f"sweep: {len(cells)} cells, {len(cells) - len(pending)} already in {config.out}, {len(pending)} to run")
    for model in config.models:
        todo = [c for c in pending if c.model == model]
        if todo:  # a model whose cells are all finished is never loaded
            _run_model(config, model, todo, rows, progress)
    return SweepSummary(
        ran=len(pending), skipped=len(cells) - len(pending), out=config.out, seconds=time.perf_counter() - t_start
    )


class _Bench:
    """One model loaded, captured and compiled once, with its held-out windows and baseline."""

    def __init__(self, config: SweepConfig, model: ModelEntry):
        import mpqc
        from mpqc.data import load_tokens, split_tokens, text_prefix
        from mpqc.evaluate import check_windows_fit, perplexity_of, sample_windows, window_nlls

        t0 = time.perf_counter()
        s = config.search
        hf_model, tokenizer = mpqc.load_model(
            model.path, cache=False, device=s["device"], dtype=getattr(torch, s["dtype"])
        )
        counts = parameter_counts(hf_model)
        self.params, self.params_non_embedding = counts["total"], counts["non_embedding"]
        example = torch.zeros(2, min(s["seq_len"], 64), dtype=torch.long)
        self.graph = mpqc.capture(hf_model, (example,))
        self.search_tokens, holdout = split_tokens(load_tokens(tokenizer, config.text))
        # Held-out windows drawn once, with their own seed: every cell and the baseline see the same text.
        self.prefix = text_prefix(tokenizer)  # the BOS, for models that add one
        part = f"the search part (the first 90%) of the text as {model.name}'s tokenizer reads it"
        check_windows_fit(self.search_tokens, s["seq_len"], s["n_samples"], self.prefix, part=part)  # before any cell
        self.windows = sample_windows(holdout, s["seq_len"], config.eval["n_samples"], config.eval["seed"], self.prefix)
        self.qmodel = mpqc.compile(self.graph, mpqc.Plan.uniform(self.graph, s["high"]))
        self.nll_base = window_nlls(self.qmodel, self.windows, batch_size=s["batch_size"])
        self.ppl_base = perplexity_of(float(self.nll_base.mean()))
        self.nll_base_text = _floats_text(self.nll_base)  # the same in every row of the model
        _log(
            f"sweep: {model.name}: {self.params:,} parameters ({self.graph.total_params:,} in matmuls), "
            f"all-{s['high']} held-out perplexity {self.ppl_base:.3f}; ready in {time.perf_counter() - t0:.1f} s"
        )


def _run_model(config: SweepConfig, model: ModelEntry, todo: list[Cell], rows: list[dict], progress: bool) -> None:
    from tqdm.auto import tqdm

    bench = _Bench(config, model)
    for cell in tqdm(todo, desc=f"sweep {model.name}", unit="cell", disable=not progress):
        rows.append(_run_cell(config, bench, cell))
        _write_raw(config.out, rows)


def _search_config(config: SweepConfig, cell: Cell, key: str, prefix):
    """The search of one cell: the sweep's [search] settings with the cell's own values."""
    from mpqc.search import SearchConfig

    s = config.search
    return SearchConfig(
        budget=("params", cell.ratio),
        granularity=cell.granularity,
        low=cell.low,
        high=s["high"],
        weights_only=cell.weights_only,
        sampler=s["sampler"],
        n_trials=s["n_trials"],
        seq_len=s["seq_len"],
        n_samples=s["n_samples"],
        batch_size=s["batch_size"],
        seed=cell.seed,
        block_size=cell.block_size,
        storage=s["storage"] or None,
        study_name=f"sweep-{key}",
        keep_high=tuple(s["keep_high"]),
        prefix=prefix,
        # A sweep measures each cell's plan on its own held-out windows: the search runs as
        # the paper's did (every trial on all windows, the best trial as it is, every matmul).
        pruner=None,
        rescore=0,
        baselines=False,
        search_dominated=True,
    )


def _run_cell(config: SweepConfig, bench: _Bench, cell: Cell) -> dict:
    import mpqc
    from mpqc.evaluate import perplexity_of, window_nlls

    s, key = config.search, config.key(cell)
    t0 = time.perf_counter()
    result = mpqc.search.run(
        bench.graph,
        bench.search_tokens,
        _search_config(config, cell, key, bench.prefix),
        qmodel=bench.qmodel,
        progress=False,
    )
    bench.qmodel.set_plan(result.plan)
    nll_q = window_nlls(bench.qmodel, bench.windows, batch_size=s["batch_size"])
    ppl_q = perplexity_of(float(nll_q.mean()))
    trials = sum(t.state.name == "COMPLETE" for t in result.study.trials)
    row = {
        "model": cell.model.name,
        "params": bench.params,
        "params_non_embedding": bench.params_non_embedding,
        "matmul_params": bench.graph.total_params,
        "granularity": cell.granularity,
        "ratio": cell.ratio,
        "low": cell.low,
        "high": s["high"],
        "weights_only": cell.weights_only,
        "block_size": cell.block_size,
        # where Law 2 puts a per-vector or per-tensor block on the block-size axis
        "block_elements": result.plan.elements_per_scale(),
        "seed": cell.seed,
        "train_seed": "" if cell.model.train_seed is None else cell.model.train_seed,
        "ppl_base": bench.ppl_base,
        "ppl_q": ppl_q,
        "delta_ppl": (ppl_q - bench.ppl_base) / bench.ppl_base,
        # each window's mean NLL, so mpqc fit can resample the evaluation windows too
        "window_nll_base": bench.nll_base_text,
        "window_nll_q": _floats_text(nll_q),
        "achieved": result.achieved,
        "q_r_definition": result.plan.q_r_definition,
        "average_bits": result.plan.average_bits(),
        "total_bits": result.plan.weight_bits(),
        "search_ppl": result.perplexity,
        "trials": trials,
        "sampler": s["sampler"],
        "seq_len": s["seq_len"],
        "n_samples": s["n_samples"],
        "eval_samples": config.eval["n_samples"],
        "seconds": round(time.perf_counter() - t0, 3),
        "notes": "; ".join(result.notes),
        "key": key,
    }
    _log(
        f"sweep: {cell.model.name} {cell.granularity} Q_r>={cell.ratio:g} {cell.low}"
        f"{' (weights only)' if cell.weights_only else ''} block {cell.block_size} seed {cell.seed}: "
        f"achieved {result.achieved:.3f}, held-out ppl {bench.ppl_base:.3f} -> {ppl_q:.3f} "
        f"({100 * row['delta_ppl']:+.2f}%) in {row['seconds']:.1f} s"
    )
    return row


def _floats_text(values: torch.Tensor) -> str:
    return " ".join(f"{v:.9g}" for v in values.tolist())  # 9 digits: the NLL to ~1e-9, relative


# ---- several workers on one storage -------------------------------------------------------------

CLAIM_HEARTBEAT = 10  # seconds between a claim's heartbeats; a claim 2x this old is a killed worker's
WAIT_SECONDS = 2.0  # how often a worker with nothing to claim looks again


class _SharedCells:
    """The cells of a sweep as claims in its storage: each cell run by one worker, its row kept there."""

    def __init__(self, config: SweepConfig):
        from mpqc.search.storage import open_storage

        self.storage = open_storage(config.search["storage"], heartbeat=CLAIM_HEARTBEAT)
        self._claims = {}

    def claim(self, key: str):
        from mpqc.search.workers import Claim

        if key not in self._claims:
            self._claims[key] = Claim(self.storage, f"sweep-{key}:cell", heartbeat=CLAIM_HEARTBEAT)
        return self._claims[key]

    def row(self, key: str) -> dict | None:
        return self.claim(key).result()

    def state(self, key: str) -> str:
        """ "done", "running" or "todo", without creating anything in the storage (a dry run)."""
        import optuna

        try:
            optuna.load_study(study_name=f"sweep-{key}:cell", storage=self.storage)
        except KeyError:
            return "todo"
        claim = self.claim(key)
        return "done" if claim.result() is not None else "running" if claim.busy() else "todo"


def _run_shared(config: SweepConfig, progress: bool) -> SweepSummary:
    """Claim and run cells until every cell is done by some worker, then write the whole table."""
    t_start = time.perf_counter()
    local = _read_raw(config.out)  # rows already here (an earlier run) count as done
    done_here = {r["key"] for r in local}
    shared, cells, ran = _SharedCells(config), config.cells(), 0
    while True:
        pending = [c for c in cells if config.key(c) not in done_here and shared.row(config.key(c)) is None]
        if not pending:
            break
        n = _run_claimable(config, shared, pending, local, progress)
        ran += n
        if n == 0:  # every pending cell is another worker's: wait for it, or for its claim to lapse
            _log(f"sweep: {len(pending)} cells are running on other workers; waiting")
            time.sleep(WAIT_SECONDS)
    _write_shared(config, shared, local)
    return SweepSummary(ran=ran, skipped=len(cells) - ran, out=config.out, seconds=time.perf_counter() - t_start)


def _run_claimable(config: SweepConfig, shared: _SharedCells, pending: list[Cell], local, progress: bool) -> int:
    """Run each pending cell this worker can claim (a model loads at its first claimed cell)."""
    ran = 0
    for model in config.models:
        bench = None
        for cell in [c for c in pending if c.model == model]:
            claim = shared.claim(config.key(cell))
            if not claim.acquire():
                continue
            try:
                bench = bench or _Bench(config, model)
                row = _run_cell(config, bench, cell)
            except BaseException:
                claim.release()  # another worker may take the cell
                raise
            claim.done(json_safe(row))
            ran += 1
            _write_shared(config, shared, local)
    return ran


def _write_shared(config: SweepConfig, shared: _SharedCells, local: list[dict]) -> None:
    """The table every worker writes: rows of other cells kept, then this sweep's cells in order."""
    keys = [config.key(c) for c in config.cells()]
    here = {r["key"]: r for r in local}
    mine = set(keys)
    rows = [r for r in local if r["key"] not in mine]
    # a claim's row stored before a column existed gets the column's old meaning
    rows += [_complete(row) for key in keys if (row := shared.row(key) or here.get(key)) is not None]
    _write_raw(config.out, rows)


def cell_states(config: SweepConfig) -> dict[str, str]:
    """Each cell's key -> "done", "running" (claimed by a worker) or "todo"; from the storage when
    the sweep has one, else from its results CSV."""
    done = finished_keys(config.out)
    shared = _SharedCells(config) if config.search["storage"] else None
    states = {}
    for cell in config.cells():
        key = config.key(cell)
        states[key] = "done" if key in done else shared.state(key) if shared else "todo"
    return states
