"""Plug your own Optuna sampler into mpqc's precision search.

mpqc encodes a plan as one priority in [0, 1] per component and decodes it under the
budget, so any optuna.samplers.BaseSampler works unchanged. This one is a small local
search: after a few random trials it copies the best trial's priorities and swaps the
priorities of a few components, which moves a handful of components between low and high
precision while the budget stays met.

    python examples/custom_sampler.py                 # embedded SmolLM2-135M, 10 trials
    mpqc search --sampler examples.custom_sampler:SwapSampler --sampler-kwargs '{"n_swaps": 3}'
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import FloatDistribution


class SwapSampler(optuna.samplers.BaseSampler):
    """Random for the first ``n_startup`` trials, then the best trial with ``n_swaps`` priority swaps."""

    def __init__(self, n_startup: int = 4, n_swaps: int = 2, seed: int | None = None):
        self.n_startup, self.n_swaps = n_startup, n_swaps
        self._rng = np.random.default_rng(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        # Sample all priorities together (relative sampling) once the space is known.
        return {
            k: d
            for k, d in optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False)).items()
            if isinstance(d, FloatDistribution)
        }

    def sample_relative(self, study, trial, search_space):
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < self.n_startup or not search_space:
            return {}
        best = min(done, key=lambda t: t.value)
        params = {k: best.params[k] for k in search_space}
        keys = list(params)
        for _ in range(self.n_swaps):
            a, b = self._rng.choice(len(keys), size=2, replace=False)
            params[keys[a]], params[keys[b]] = params[keys[b]], params[keys[a]]
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._random.sample_independent(study, trial, param_name, param_distribution)


def main():
    import torch

    import mpqc
    from mpqc.data import load_tokens, split_tokens

    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    tokens, _ = split_tokens(load_tokens(tokenizer))
    result = mpqc.search.run(
        graph, tokens, ratio=0.9, sampler=SwapSampler(seed=0), n_trials=10, seq_len=128, n_samples=8
    )
    print(f"best perplexity {result.perplexity:.3f} at Q_r {result.achieved:.4f}")
    print(result.plan.to_json()[:400], "...")


if __name__ == "__main__":
    main()
