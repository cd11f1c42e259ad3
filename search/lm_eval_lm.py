"""MpqcLM: an lm-eval-harness LM over a compiled mpqc model. Importing this module imports lm_eval.

``mpqc.search.lm_eval_adapter`` loads it on first use, so that ``mpqc.search`` imports
without lm_eval; the reasons the adapter never pads are in that module's docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mpqc.evaluate import logits_of, model_device

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer gives one
_TOKENIZER_INFINITY = 1_000_000  # tokenizers report ~1e30 when they set no model_max_length
# Sampling-only generation settings: they do nothing under greedy decoding.
_SAMPLING_ONLY = {"top_p", "top_k", "min_p", "typical_p"}


class MpqcLM(TemplateLM):
    """An ``lm_eval`` LM over a compiled mpqc model (or any module mapping input_ids to logits).

    ``model``: a ``QuantizedModel`` (``qmodel(input_ids) -> logits``) or a Hugging Face causal
    LM; it is used as it is, so ``qmodel.set_plan(...)`` between evaluations changes what is
    measured. ``tokenizer``: the model's Hugging Face tokenizer. ``max_length``: the longest
    input (default: the model's config, else the tokenizer's ``model_max_length``, else
    2048). ``add_bos_token``: passed to the tokenizer as ``add_special_tokens`` (None: the
    tokenizer's default), as in HFLM.
    """

    backend = "causal"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        progress: bool = False,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a module mapping input_ids to logits, got {type(model).__name__}")
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError(
                "the tokenizer has neither an EOS nor a BOS token; lm-eval needs one to condition "
                "empty contexts and to stop generation"
            )
        self.model = model
        self.tokenizer = tokenizer
        self._batch_size = batch_size
        self._max_length = _resolve_max_length(model, tokenizer, max_length)
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.progress = progress
        self._device = model_device(model)

    # -- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        bos = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        encoding = self.tokenizer.encode(string, **kw)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring (progress bars only with progress=True, unless lm-eval asks otherwise)
    def loglikelihood(self, requests, disable_tqdm: bool | None = None) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=not self.progress if disable_tqdm is None else disable_tqdm)

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits for equal-length rows, [batch, seq, vocab], without gradients, in eval mode."""
        was_training = isinstance(self.model, torch.nn.Module) and self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                return logits_of(self.model, torch.tensor(rows, dtype=torch.long, device=self._device))
        finally:
            if was_training:
                self.model.train()

    def _batches(self, keyed: dict, progress_desc: str | None, total: int | None = None):
        """Yield lists of at most batch_size items from each group of ``keyed``, longest groups first."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=progress_desc, unit="req", disable=progress_desc is None)
        for key in sorted(keyed, key=lambda k: (-k[0], k)):
            items = keyed[key]
            for start in range(0, len(items), self._batch_size):
                chunk = items[start : start + self._batch_size]
                yield chunk
                bar.update(len(chunk))
        bar.close()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool | None = None, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), continuation is greedy) for (key, context_enc, continuation_enc)."""
        groups: dict[tuple, list] = {}
        for i, (key, context_enc, continuation_enc) in enumerate(requests):
            context_enc, continuation_enc = list(context_enc), list(continuation_enc)
            if not context_enc or not continuation_enc:
                raise ValueError(
                    f"request {key!r}: context and continuation must each be at least one token "
                    f"(got {len(context_enc)} and {len(continuation_enc)})"
                )
            if len(continuation_enc) > self.max_length:
                raise ValueError(
                    f"request {key!r}: a continuation of {len(continuation_enc)} tokens does not "
                    f"fit in max_length {self.max_length}"
                )
            # Left-truncate to max_length + 1 tokens, then drop the last: it is only predicted.
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            groups.setdefault((len(inp),), []).append((i, key, inp, continuation_enc))
        results: list = [None] * len(requests)
        desc = None if (not self.progress if disable_tqdm is None else disable_tqdm) else "lm-eval loglikelihood"
        for chunk in self._batches(groups, desc, total=len(requests)):
            logits = self._forward([inp for _, _, inp, _ in chunk])
            length = logits.shape[1]
            for row, (i, key, _, cont) in enumerate(chunk):
                # float32 log-softmax of the continuation's positions only (a whole row's
                # float copy would be seq x vocab).
                logprobs = F.log_softmax(logits[row, length - len(cont) : length].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                value = float(logprobs.gather(-1, target[:, None]).double().sum())
                results[i] = (value, greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool | None = None) -> list[float]:
        """Log-likelihood of each whole string, in disjoint windows of at most max_length tokens
        (each window conditioned on as much preceding text as fits), the first on the BOS (else EOS)."""
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(index)
        disable_tqdm = not self.progress if disable_tqdm is None else disable_tqdm
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (value, _) in zip(owner, scores):
            totals[index] += value
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation
    def _generation_settings(self, gen_kwargs) -> tuple[list[str], int]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"until must be a string or a list of strings, got {gen_kwargs.get('until')!r}")
        max_gen = None
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            value = kw.pop(alias, None)
            if max_gen is None and value is not None:
                max_gen = int(value)
        max_gen = self.max_gen_toks if max_gen is None else max_gen
        if max_gen < 1:
            raise ValueError(f"max_gen_toks must be at least 1, got {max_gen}")
        do_sample = kw.pop("do_sample", False)
        temperature = kw.pop("temperature", 0.0)
        if do_sample or (temperature or 0.0) > 0.0:
            raise ValueError(
                f"MpqcLM generates greedily; the task asks for sampling ({gen_kwargs}); "
                "set do_sample: false (temperature 0) in its generation_kwargs"
            )
        if kw.pop("num_beams", 1) != 1:
            raise ValueError("MpqcLM generates greedily: num_beams must be 1")
        unknown = set(kw) - _SAMPLING_ONLY
        if unknown:
            raise ValueError(
                f"generation settings MpqcLM does not implement: {sorted(unknown)}; it supports "
                "until, max_gen_toks (or max_new_tokens), do_sample=false, temperature=0"
            )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)  # as HFLM: the EOS text is a stop sequence too
        return until, max_gen

    def generate_until(self, requests, disable_tqdm: bool | None = None) -> list[str]:
        """Greedy continuation of each context, cut at the first of ``until`` (and EOS), at most
        ``max_gen_toks`` tokens; the context is left-truncated to leave room for them."""
        groups: dict[tuple, list] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_gen = self._generation_settings(gen_kwargs)
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in max_length {self.max_length}")
            context_enc = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
            groups.setdefault((len(context_enc), tuple(until), max_gen), []).append(
                (i, (context, gen_kwargs), context_enc, until, max_gen)
            )
        results: list = [None] * len(requests)
        desc = None if (not self.progress if disable_tqdm is None else disable_tqdm) else "lm-eval generate_until"
        for chunk in self._batches(groups, desc, total=len(requests)):
            rows = [list(context_enc) for _, _, context_enc, _, _ in chunk]
            generated: list[list[int]] = [[] for _ in chunk]
            active = list(range(len(chunk)))
            while active:
                # Every active row has the same length: no padding.
                logits = self._forward([rows[r] for r in active])
                next_tokens = logits[:, -1].argmax(dim=-1).tolist()
                still = []
                for r, token in zip(active, next_tokens):
                    until, max_gen = chunk[r][3], chunk[r][4]
                    if token == self.eot_token_id:
                        continue
                    rows[r].append(token)
                    generated[r].append(token)
                    text = self.tok_decode(generated[r])
                    if len(generated[r]) < max_gen and not any(s and s in text for s in until):
                        still.append(r)
                active = still
            for r, (i, key, _, until, _) in enumerate(chunk):
                text = self.tok_decode(generated[r])
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", key, text)
        return results


def _resolve_max_length(model, tokenizer, max_length: int | None) -> int:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int of at least 2, got {max_length!r}")
        return max_length
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 1 < value < _TOKENIZER_INFINITY:
        return value
    return DEFAULT_MAX_LENGTH
