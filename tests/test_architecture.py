"""The package's layers, read from its source: imports run one way, `import mpqc` stays light,
functions stay short. docs/architecture.md states the rules these tests check."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Top-level folders and the package each installs as (pyproject's package-dir mapping).
FOLDERS = {"mpqc": "mpqc", "passes": "mpqc.passes", "search": "mpqc.search", "export": "mpqc.export"}
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in MODULES:
            return candidate
    return None


def imports_of(module: str) -> set[str]:
    """Every mpqc module ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        out.update(t for t in map(_known, targets) if t is not None and t != module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def layer(module: str) -> str:
    for prefix, name in (
        ("mpqc.cli", "cli"),
        ("mpqc.studies", "studies"),
        ("mpqc.search", "search"),
        ("mpqc.export", "export"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


# Which layers each layer may import (core -> search/export -> studies -> cli).
ALLOWED = {
    "core": {"core"},
    "search": {"core", "search"},
    "export": {"core", "export"},
    "studies": {"core", "search", "export", "studies"},
    "cli": {"core", "search", "export", "studies", "cli"},
}


def test_the_walk_sees_the_whole_package():
    # A guard on the test itself: a graph that misses the layers would pass everything.
    assert {
        "mpqc.cli",
        "mpqc.studies.sweep",
        "mpqc.search.study",
        "mpqc.export.onnx",
        "mpqc.passes.analysis",
        "mpqc.io",
        "mpqc.graph",
    } <= set(MODULES)
    assert "mpqc.search.budget" in GRAPH["mpqc.search.study"] and "mpqc.io" in GRAPH["mpqc.search.results"]
    assert "mpqc.export.functions" in GRAPH["mpqc.export.onnx"]  # a relative `from . import name`


def test_imports_run_one_way_between_layers():
    wrong = sorted(
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if layer(t) not in ALLOWED[layer(m)]
    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_nothing_outside_the_cli_imports_it():
    wrong = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts if layer(t) == "cli" != layer(m))
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_mpqc_is_light_and_the_layers_load_on_use():
    code = (
        "import sys, mpqc\n"
        "heavy = [m for m in ('optuna', 'onnx', 'onnxruntime', 'onnxscript', 'lm_eval', 'xllamacpp', 'gguf')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(mpqc.export.to_onnx) and callable(mpqc.search.run)\n"
        "assert 'optuna' in sys.modules and 'onnx' in sys.modules and 'lm_eval' not in sys.modules\n"
        "assert callable(mpqc.export.to_gguf) and 'xllamacpp' not in sys.modules and 'gguf' not in sys.modules\n"
        "import mpqc.studies.laws\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def long_functions() -> list[str]:
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{module}.{node.name}: {lines} lines")
    return out


def test_no_function_is_longer_than_80_lines():
    assert not long_functions(), "\n".join(long_functions())


@pytest.mark.parametrize("command", ["inspect", "compile", "search", "export", "predict collect", "predict plan"])
def test_every_command_that_loads_a_model_takes_device_and_dtype(command):
    from mpqc.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            *command.split(),
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            *(["--out", "x.csv"] if command == "predict collect" else []),
            *(["--predictor", "p.json", "--plan", "a.json"] if command == "predict plan" else []),
        ]
    )
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
