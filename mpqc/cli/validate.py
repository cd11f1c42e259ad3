"""What a command can check before its model loads: arguments, output paths, storage, the text.

Loading SmolLM2 takes about a minute and a search many more; every check here takes
milliseconds (the text: the tokenizer's few seconds), so a mistake costs nothing. ``main``
runs ``before_work`` (output paths, device) for every command; ``mpqc search`` also runs ``search_settings``
before loading anything and ``search_text`` once the tokenizer (not the model) is loaded.
"""

from __future__ import annotations

import json

from mpqc.io import check_output_dir, check_output_file

# The output paths of each command: the argument and whether it names a directory or a file.
OUTPUTS: dict[str, dict[str, str]] = {
    "formats": {"json": "file"},
    "inspect": {"json": "file"},
    "compile": {"json": "file"},
    "search": {"out": "dir", "json": "file"},
    "export": {"output": "file", "json": "file"},
    "sweep": {"out": "file"},
    "bitsweep": {"out": "file"},
    "fit": {"out": "dir"},
    "predict collect": {"out": "file"},
    "predict fit": {"out": "file", "json": "file"},
    "predict plan": {"json": "file"},
}
HOLDOUT = "the held-out part of the text (its last 10%)"
SEARCH_PART = "the search part of the text (its first 90%)"


def command_name(args) -> str:
    sub = getattr(args, "predict_command", None)
    return f"{args.command} {sub}" if sub else args.command


def before_work(args) -> None:
    """What every command checks first: its output paths, its plan files and its device."""
    check_outputs(args)
    plans = getattr(args, "plan", None)
    if plans:
        from mpqc.plan import read_plan_file

        for path in [plans] if isinstance(plans, str) else plans:
            read_plan_file(path)  # malformed JSON or a missing key: now, not after the model loads
    if getattr(args, "device", None) is not None:
        from mpqc.models import parse_device

        parse_device(args.device)


def check_outputs(args) -> None:
    """Every output path of the command can be written: not an existing file where a directory
    is meant (or the reverse), not under a read-only place."""
    for attr, kind in OUTPUTS.get(command_name(args), {}).items():
        path = getattr(args, attr, None)
        if path:
            flag = "-o/--output" if attr == "output" else f"--{attr}"
            (check_output_dir if kind == "dir" else check_output_file)(path, flag)


def positive_int(flag: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def sampler_kwargs(text: str | None) -> dict | None:
    """--sampler-kwargs: a JSON object of keyword arguments."""
    if not text:
        return None
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sampler-kwargs is not valid JSON ({e}); e.g. '{{\"n_startup_trials\": 5}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--sampler-kwargs is a JSON object of keyword arguments, got {text!r}")
    return kwargs


def search_settings(config, args) -> None:
    """Everything of a search that needs no model: numbers, formats, block size, sampler, storage."""
    from mpqc.search.budget import search_precisions
    from mpqc.search.samplers import make_sampler
    from mpqc.search.storage import open_storage

    for flag in ("seq_len", "n_samples", "batch_size", "holdout_samples"):
        positive_int("--" + flag.replace("_", "-"), getattr(args, flag, None))
    lows, _ = search_precisions(config.low, config.high, weights_only=config.weights_only)
    for fmt in (f for low in lows for f in (low.weight, low.activation)):
        if fmt is not None and fmt.family != "cast":
            fmt.with_block(config.block_size)  # a block size the format cannot take fails here
    try:
        make_sampler(config.sampler, seed=config.effective_sampler_seed, kwargs=config.sampler_kwargs)
    except TypeError as e:
        raise ValueError(f"--sampler {config.sampler} does not take these --sampler-kwargs: {e}") from None
    if config.storage is not None:
        open_storage(config.storage, heartbeat=config.heartbeat)  # reachable, and its tables exist


def search_text(args, tokenizer, config):
    """(search tokens, held-out tokens, prefix) of the search's text, once the windows are known
    to fit (the trial windows, the Fisher pass's and the re-scoring's, all from the search part);
    sets ``args.holdout_samples`` (when not given: --n-samples or the most that fit)."""
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.evaluate import check_windows_fit, max_windows

    search, holdout = split_tokens(load_tokens(tokenizer, args.text))
    prefix = text_prefix(tokenizer)
    for flag, n in (
        ("--n-samples", config.n_samples),
        (
            "the re-scoring (2 x --n-samples more windows; --rescore 0 turns it off)",
            config.extra_windows * (config.rescore > 1),
        ),
        ("the sensitivity pass", config.sensitivity_windows),
    ):
        _fit(flag, lambda n=n: check_windows_fit(search, args.seq_len, n, prefix, part=SEARCH_PART))
    if args.holdout_samples is None:
        fits = max_windows(int(holdout.numel()), args.seq_len, len(prefix))
        args.holdout_samples = min(args.n_samples, max(fits, 1))
    _fit(
        "--holdout-samples",
        lambda: check_windows_fit(holdout, args.seq_len, args.holdout_samples, prefix, part=HOLDOUT),
    )
    return search, holdout, prefix


def holdout_text(args, tokenizer):
    """(held-out tokens, prefix) for a command that reports on the held-out text (``mpqc compile``)."""
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.evaluate import check_windows_fit

    _, holdout = split_tokens(load_tokens(tokenizer, args.text))
    prefix = text_prefix(tokenizer)
    _fit("--n-samples", lambda: check_windows_fit(holdout, args.seq_len, args.n_samples, prefix, part=HOLDOUT))
    return holdout, prefix


def _fit(flag: str, check) -> None:
    try:
        check()
    except ValueError as e:
        raise ValueError(f"{flag} (with --seq-len): {e}") from None


def interrupted(args) -> str:
    """What an interrupted command kept, and how to go on."""
    name = command_name(args)
    if name == "search":
        if args.storage:
            return f"the completed trials are stored in {args.storage}: run the same command to resume"
        return "no --storage was given, so its trials are lost; add --storage FILE to make a search resumable"
    if name in ("sweep", "bitsweep"):
        return "the finished cells are kept: run the same command to resume"
    if name == "predict collect":
        return f"the finished plans are kept in {args.out}: run the same command to resume"
    return "nothing was written"
