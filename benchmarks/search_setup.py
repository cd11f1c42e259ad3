"""The setting ``search_quality.py`` judges strategies in, shared with the probes of it.

SmolLM2-135M (the embedded default) captured, its BF16 compiled model, the default text split
into its search part and its held-out tenth, and the windows: the search's own, drawn by
``SearchConfig.windows`` exactly as ``mpqc.search.run`` draws them, and the held-out ones
(seed + ``HOLDOUT_SEED_OFFSET``), so every probe measures on the windows the table does.
"""

from __future__ import annotations

import dataclasses

import torch

import mpqc
from mpqc.data import load_tokens, split_tokens, text_prefix
from mpqc.evaluate import sample_windows
from mpqc.search import SearchConfig

HOLDOUT_SEED_OFFSET = 7
_COUNT_FIELD = {"search": "n_samples", "fisher": "sensitivity_windows", "fresh": "rescore_windows"}


@dataclasses.dataclass(frozen=True)
class Bench:
    graph: object
    qmodel: object  # compiled at all-BF16; probes switch its plan
    search_tokens: torch.Tensor
    holdout: torch.Tensor
    prefix: tuple[int, ...]
    seed: int
    seq_len: int

    def windows(self, role: str, n: int) -> torch.Tensor:
        """``n`` windows of the search text for ``role`` ("search", "fisher" or "fresh")."""
        config = SearchConfig(budget=("params", 0.5), seq_len=self.seq_len, seed=self.seed, prefix=self.prefix)
        return config.replace(**{_COUNT_FIELD[role]: n}).windows(self.search_tokens, role)

    def held_out(self, n: int = 64) -> torch.Tensor:
        return sample_windows(self.holdout, self.seq_len, n, self.seed + HOLDOUT_SEED_OFFSET, self.prefix)


def load(seed: int = 0, seq_len: int = 128) -> Bench:
    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    search_tokens, holdout = split_tokens(load_tokens(tokenizer))
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
    return Bench(graph, qmodel, search_tokens, holdout, tuple(text_prefix(tokenizer)), seed, seq_len)
