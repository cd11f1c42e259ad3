"""The bit-level view of Dettmers & Zettlemoyer (2023): is 4 bits bit-optimal here?

For each model, each k-bit block format (``int3`` ... ``int8``, and float formats) and each block
size, one uniform weight-only plan: every matmul weight in that format (activations stay high;
``keep_high`` components, the lm_head by default, stay high too), measured by held-out perplexity
against total model bits. The bit-optimal k of a total-bits budget is the element width of the
lowest-perplexity configuration, over every model, that fits in it.

    config = mpqc.studies.bitlevel.load_config("examples/bitlevel_small.toml")
    summary = mpqc.studies.bitlevel.run(config)           # also: mpqc bitsweep CONFIG.toml
    rows = mpqc.studies.bitlevel.read_results(config.out)
    mpqc.studies.bitlevel.bit_optimal(rows)               # the Pareto front, k per budget, the verdict

Total model bits = the matmul weights' storage (codes, block and tensor scales:
``plan.weight_bits()``; kept-high weights at their 16 bits) + every other parameter (norms,
untied embeddings) at 16 bits. Each model's all-high plan is a row too (format ``high``, k = 16).
Perplexities are compared across models, so the models of one results file should share a
tokenizer and a text (a family). Cells are keyed like a sweep's: finished ones are rows of one CSV,
rewritten atomically after each cell, and skipped when the study runs again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from collections import Counter

import torch

from mpqc.io import read_csv, typed_rows, write_csv_atomic
from mpqc.plan import q_r_definition, resolve_keep_high
from mpqc.studies import sweep

__all__ = [
    "COLUMNS",
    "DEFAULT_BLOCK_SIZES",
    "DEFAULT_FORMATS",
    "BitCell",
    "BitConfig",
    "bit_optimal",
    "config_from_dict",
    "finished_keys",
    "load_config",
    "read_results",
    "run",
]

# k = 3..8 integers (absmax, fp32 scale), and the float formats of 4, 6 and 8 bits.
DEFAULT_FORMATS = ("int3", "int4", "int5", "int6", "int7", "int8", "fp4_e2m1", "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3")
DEFAULT_BLOCK_SIZES = (32, 64, 128, 256, 512)
OTHER_PARAM_BITS = 16  # parameters outside the matmul weights (norms, untied embeddings)
COLUMNS = (
    "model",
    "params",
    "matmul_params",
    "format",
    "element",
    "bits",
    "block_size",
    "q_r_definition",
    "weight_bits",
    "other_bits",
    "total_bits",
    "bits_per_param",
    "ppl_base",
    "ppl",
    "delta_ppl",
    "seq_len",
    "eval_samples",
    "seconds",
    "key",
)
_INT = {"params", "matmul_params", "bits", "weight_bits", "other_bits", "total_bits", "seq_len", "eval_samples"}
_FLOAT = {"bits_per_param", "ppl_base", "ppl", "delta_ppl", "seconds"}

_TOP_KEYS = {"out", "text", "models", "grid", "eval"}
_GRID_DEFAULTS = {"formats": list(DEFAULT_FORMATS), "block_size": list(DEFAULT_BLOCK_SIZES)}
_EVAL_DEFAULTS = {
    "seq_len": 128,
    "n_samples": 32,
    "seed": 1234,
    "batch_size": 8,
    "high": "bf16",
    "keep_high": ["lm_head"],
    "device": "cpu",
    "dtype": "float32",
}


@dataclasses.dataclass(frozen=True)
class BitCell:
    model: sweep.ModelEntry
    format: str  # a low format, or the config's high format: the model's all-high row
    block_size: int | None  # None for the all-high row


@dataclasses.dataclass(frozen=True)
class BitConfig:
    out: str
    text: str
    models: tuple[sweep.ModelEntry, ...]
    formats: tuple[str, ...]
    block_sizes: tuple[int, ...]
    eval: dict

    def cells(self) -> list[BitCell]:
        """Per model: its all-high row, then every format at every block size."""
        cells = []
        for m in self.models:
            cells.append(BitCell(m, self.eval["high"], None))
            cells += [BitCell(m, f, b) for f, b in itertools.product(self.formats, self.block_sizes)]
        return cells

    def key(self, cell: BitCell) -> str:
        """A hash of everything that decides the cell's numbers."""
        data = {
            "model": [cell.model.name, cell.model.spec],
            "text": self.text,
            "format": cell.format,
            "block_size": cell.block_size,
            "eval": {k: v for k, v in self.eval.items() if k not in ("batch_size", "device")},
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---- config -------------------------------------------------------------------------------------


def load_config(path: str) -> BitConfig:
    """Read and validate a bit-level TOML file; paths in it are relative to its folder."""
    data = sweep.read_toml(path, "bit-level config")
    return config_from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)), where=path)


def config_from_dict(data: dict, *, base_dir: str = ".", where: str = "bit-level config") -> BitConfig:
    sweep._check_keys(data, _TOP_KEYS, where)
    for key in ("out", "models"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r} (see docs/scaling.md, 'The bit-level sweep')")
    grid = sweep._section(data, "grid", _GRID_DEFAULTS, where)
    evaluation = sweep._section(data, "eval", _EVAL_DEFAULTS, where)
    models = tuple(sweep._model_entry(m, base_dir, where) for m in sweep._list(data["models"], "models", where))
    if len({m.name for m in models}) != len(models):
        raise ValueError(f"{where}: model names must be unique, got {[m.name for m in models]}")
    formats = tuple(sweep._list(grid["formats"], "grid.formats", where))
    block_sizes = tuple(sweep._list(grid["block_size"], "grid.block_size", where))
    _check_formats(formats, block_sizes, evaluation["high"], where)
    _check_eval(evaluation, where)
    evaluation["keep_high"] = sweep._keep_high(evaluation["keep_high"], where)
    return BitConfig(
        out=sweep._resolve(data["out"], base_dir),
        text=sweep._text_spec(data.get("text", "wiki"), base_dir),
        models=models,
        formats=formats,
        block_sizes=block_sizes,
        eval=evaluation,
    )


def _check_formats(formats, block_sizes, high: str, where: str) -> None:
    from mpqc.formats import get_format

    for bs in block_sizes:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"{where}: grid.block_size values are positive ints (elements per scale), got {bs!r}")
    for name in formats:
        fmt = get_format(name)  # an unknown name fails here, listing the valid ones
        if fmt.family in ("cast", "ggml"):
            raise ValueError(
                f"{where}: grid.formats {name!r} takes no block size ({fmt.family} format); "
                "give block formats such as int3 ... int8, fp4_e2m1, mxfp4"
            )
        for bs in block_sizes:
            fmt.with_block(bs)  # a block size the format cannot take fails now, not mid-study
    if get_format(high).family != "cast":
        raise ValueError(f"{where}: eval.high is the 16-bit baseline format (bf16, fp16 or fp32), got {high!r}")


def _check_eval(evaluation: dict, where: str) -> None:
    for name in ("seq_len", "n_samples", "batch_size"):
        value = evaluation[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: eval.{name} must be a positive integer, got {value!r}")
    if evaluation["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{where}: eval.dtype must be 'float32', 'bfloat16' or 'float16', got {evaluation['dtype']!r}")


# ---- results ------------------------------------------------------------------------------------


def _read_raw(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    header, rows = read_csv(path)
    if tuple(header) != COLUMNS:
        raise ValueError(f"results file {path} has columns {header}, not the bit-level study's {list(COLUMNS)}")
    return rows


def finished_keys(path: str) -> set[str]:
    """The keys of the cells already in a results CSV (none when it does not exist yet)."""
    return {r["key"] for r in _read_raw(path)}


def read_results(path: str) -> list[dict]:
    """The bit-level results CSV with typed values (block_size NaN on the all-high rows)."""
    kinds = {**{k: "int" for k in _INT}, **{k: "float" for k in _FLOAT}, "block_size": "int"}
    rows = typed_rows(_read_raw(path), kinds, where=f"results file {path}")
    if not rows:
        raise ValueError(f"results file {path} is missing or has no rows; run `mpqc bitsweep CONFIG.toml` first")
    return rows


# ---- running ------------------------------------------------------------------------------------


def run(config: BitConfig, *, progress: bool = True) -> sweep.SweepSummary:
    """Run every cell not yet in ``config.out``; a model whose cells are all done is not loaded."""
    t_start = time.perf_counter()
    rows = _read_raw(config.out)
    done = {r["key"] for r in rows}
    cells = config.cells()
    pending = [c for c in cells if config.key(c) not in done]
    sweep._log(
        f"bitsweep: {len(cells)} cells, {len(cells) - len(pending)} already in {config.out}, {len(pending)} to run"
    )
    for model in config.models:
        todo = [c for c in pending if c.model == model]
        if todo:
            _run_model(config, model, todo, rows, progress)
    return sweep.SweepSummary(len(pending), len(cells) - len(pending), config.out, time.perf_counter() - t_start)


class _Model:
    """One model captured and compiled once, with its held-out windows and all-high perplexity."""

    def __init__(self, config: BitConfig, model: sweep.ModelEntry):
        import mpqc
        from mpqc.data import load_tokens, split_tokens, text_prefix
        from mpqc.evaluate import sample_windows

        e = config.eval
        hf_model, tokenizer = mpqc.load_model(
            model.path, cache=False, device=e["device"], dtype=getattr(torch, e["dtype"])
        )
        self.params = sum(p.numel() for p in hf_model.parameters())
        self.graph = mpqc.capture(hf_model, (torch.zeros(2, min(e["seq_len"], 64), dtype=torch.long),))
        _, holdout = split_tokens(load_tokens(tokenizer, config.text))  # the part no search or training saw
        self.windows = sample_windows(holdout, e["seq_len"], e["n_samples"], e["seed"], text_prefix(tokenizer))
        self.qmodel = mpqc.compile(self.graph, mpqc.Plan.uniform(self.graph, e["high"]))
        self.batch_size = e["batch_size"]
        self.ppl_base = self.perplexity()
        self.kept = resolve_keep_high(self.graph, "matmul", e["keep_high"])
        sweep._log(
            f"bitsweep: {model.name}: {self.params:,} parameters, all-{e['high']} held-out ppl {self.ppl_base:.3f}"
        )

    def perplexity(self) -> float:
        from mpqc.evaluate import perplexity

        return perplexity(self.qmodel, windows=self.windows, batch_size=self.batch_size, progress=False)


def _run_model(config: BitConfig, model: sweep.ModelEntry, todo: list[BitCell], rows: list[dict], progress: bool):
    from tqdm.auto import tqdm

    bench = _Model(config, model)
    for cell in tqdm(todo, desc=f"bitsweep {model.name}", unit="cell", disable=not progress):
        rows.append(_run_cell(config, bench, cell))
        write_csv_atomic(config.out, rows, COLUMNS)  # the old table or the whole new one, never half


def _uniform_plan(config: BitConfig, bench: _Model, cell: BitCell):
    """Every matmul weight not kept high in the cell's format; activations stay high."""
    import mpqc

    e = config.eval
    low = {c.name: cell.format for c in bench.graph.components("matmul") if c.name not in bench.kept}
    return mpqc.Plan(
        bench.graph, low, default=e["high"], activations=False, block_size=cell.block_size, keep_high=e["keep_high"]
    )


def _run_cell(config: BitConfig, bench: _Model, cell: BitCell) -> dict:
    from mpqc.formats import get_format

    t0 = time.perf_counter()
    plan = _uniform_plan(config, bench, cell)
    bench.qmodel.set_plan(plan)
    ppl = bench.perplexity()
    fmt = get_format(cell.format)
    weight_bits = plan.weight_bits()
    other_bits = max(bench.params - bench.graph.total_params, 0) * OTHER_PARAM_BITS
    row = {
        "model": cell.model.name,
        "params": bench.params,
        "matmul_params": bench.graph.total_params,
        "format": cell.format,
        "element": fmt.element.name if fmt.element else cell.format,
        "bits": fmt.element.bits if fmt.element else fmt.element_bits,
        "block_size": "" if cell.block_size is None else cell.block_size,
        "q_r_definition": q_r_definition(config.eval["keep_high"]),
        "weight_bits": weight_bits,
        "other_bits": other_bits,
        "total_bits": weight_bits + other_bits,
        "bits_per_param": (weight_bits + other_bits) / bench.params,
        "ppl_base": bench.ppl_base,
        "ppl": ppl,
        "delta_ppl": (ppl - bench.ppl_base) / bench.ppl_base,
        "seq_len": config.eval["seq_len"],
        "eval_samples": config.eval["n_samples"],
        "seconds": round(time.perf_counter() - t0, 3),
        "key": config.key(cell),
    }
    sweep._log(
        f"bitsweep: {cell.model.name} {cell.format} block {cell.block_size}: {row['bits_per_param']:.3f} bits per "
        f"parameter, held-out ppl {bench.ppl_base:.3f} -> {ppl:.3f}"
    )
    return row


# ---- the bit-optimal k ------------------------------------------------------------------------------

N_BUDGETS = 12  # total-bits budgets, log-spaced from the smallest configuration to the largest


def _pareto(points: list[dict]) -> list[dict]:
    """The configurations with lower perplexity than every configuration of fewer total bits."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["total_bits"], p["ppl"])):
        if p["ppl"] < best:
            front.append(p)
            best = p["ppl"]
    return front


def _budgets(points: list[dict], n: int) -> list[float]:
    low, high = min(p["total_bits"] for p in points), max(p["total_bits"] for p in points)
    if n == 1 or low == high:
        return [float(high)]
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


def _config(p: dict) -> dict:
    keys = ("model", "params", "format", "bits", "block_size", "total_bits", "bits_per_param", "ppl")
    return {k: p[k] for k in keys}


def bit_optimal(rows, n_budgets: int = N_BUDGETS) -> dict:
    """The Pareto front of perplexity against total bits, the best configuration (and its k)
    within each of ``n_budgets`` log-spaced total-bits budgets, and the verdict on 4 bits."""
    points = [r for r in rows if math.isfinite(r["ppl"])]
    if not points:
        raise ValueError("bit_optimal: no row with a finite perplexity")
    front = _pareto(points)
    best = []
    for budget in _budgets(points, n_budgets):
        within = [p for p in front if p["total_bits"] <= budget * (1 + 1e-12)]  # the last front point within
        best.append({"budget_bits": budget, **_config(within[-1])})
    return {
        "pareto": [_config(p) for p in front],
        "budgets": best,
        "k_counts": dict(sorted(Counter(b["bits"] for b in best).items())),
        "models": sorted({r["model"] for r in rows}),
        "verdict": _verdict(best, len({r["model"] for r in rows})),
    }


def _verdict(best: list[dict], n_models: int) -> str:
    counts = Counter(b["bits"] for b in best)
    top, n_top = counts.most_common(1)[0]
    spread = ", ".join(f"k = {k}: {n}" for k, n in sorted(counts.items()))
    answer = "yes" if top == 4 else f"no: k = {top} is bit-optimal at most budgets"
    caveat = "" if n_models > 1 else " (one model: its k trades bits for perplexity only within that size)"
    return f"is 4 bits bit-optimal here? {answer} ({spread} of {len(best)} total-bits budgets){caveat}"
