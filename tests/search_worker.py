"""A search worker in its own process, for the resume and multi-worker tests.

python tests/search_worker.py STORAGE STUDY N_TRIALS [PAUSE_SECONDS] [SAMPLER]
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import captured  # noqa: E402

import mpqc  # noqa: E402

TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))


def main():
    storage, study, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    sampler = sys.argv[5] if len(sys.argv) > 5 else "tpe"
    _, graph = captured("llama")
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
    if pause:  # slow each evaluation down so that a kill lands mid-search
        forward = qmodel.forward
        qmodel.forward = lambda ids: (time.sleep(pause), forward(ids))[1]
    mpqc.search.run(
        graph,
        TOKENS,
        ratio=0.6,
        sampler=sampler,
        n_trials=n_trials,
        seq_len=16,
        n_samples=2,
        storage=storage,
        study_name=study,
        qmodel=qmodel,
        progress=False,
        heartbeat=1,
        sampler_seed=os.getpid(),
    )


if __name__ == "__main__":
    main()
