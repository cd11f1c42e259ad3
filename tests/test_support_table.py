"""The support table (docs/architectures.md): every causal-LM type in transformers through mpqc.

The full walk exports every type (about 1,100 CPU seconds, measured with the committed table),
more than the default suite's CI budget leaves, so it is the ``full_walk`` marker, deselected by
default: ``python -m pytest -m full_walk tests/test_support_table.py`` runs it, and
``python tests/support_table.py`` regenerates the table. The default tests check the committed
table and walk a sample of types that covers each outcome.
"""

from __future__ import annotations

import pytest
import support_table as st
import transformers

# One type per outcome, and the cases this table was built for: Falcon's numpy_T weights,
# a Mamba recurrence that fixes the sequence length, a weight behind torch.no_grad, a model
# that builds a KV cache from its config.
SAMPLE = ("falcon", "gpt2", "mamba", "deepseek_v32", "granitemoeshared", "gemma4_assistant")
BAD = ("wrong", "error", "timeout")


@pytest.fixture(scope="module")
def committed():
    return st.read_table()


def _same_transformers(data) -> bool:
    return data["versions"]["transformers"] == transformers.__version__


def test_the_committed_markdown_is_rendered_from_the_committed_rows(committed):
    data, rows = committed
    assert st.TABLE_MD.read_text() == st.render_markdown(rows, data["versions"])
    assert data["counts"] == st.counts(rows)


def test_the_committed_table_covers_every_type_and_none_is_silently_wrong(committed):
    data, rows = committed
    if _same_transformers(data):
        assert [r.model_type for r in rows] == st.causal_lm_types()
    assert [(r.model_type, r.status, r.reason) for r in rows if r.status in BAD] == []
    # Refusals and HF failures say why.
    assert all(r.reason for r in rows if r.status in ("refused", "hf-fails"))


def _compare(rows, committed_rows) -> list[tuple]:
    """(type, what the walk found, what the table says) where they disagree."""
    by_type = {r.model_type: r for r in committed_rows}
    diffs = []
    for r in rows:
        c = by_type.get(r.model_type)
        found = (r.status, r.params, r.expected_params, r.roles)
        said = None if c is None else (c.status, c.params, c.expected_params, c.roles)
        if found != said:
            diffs.append((r.model_type, found, said, r.reason))
    return diffs


def test_a_sample_of_types_walks_as_the_table_says(committed):
    data, committed_rows = committed
    rows = st.walk(list(SAMPLE), workers=1)
    assert [(r.model_type, r.status, r.reason) for r in rows if r.status in BAD] == []
    if _same_transformers(data):
        assert _compare(rows, committed_rows) == []
    by_type = {r.model_type: r for r in rows}
    assert by_type["falcon"].status == "supported" and by_type["falcon"].params == by_type["falcon"].expected_params
    assert "specialized the sequence dimension" in by_type["mamba"].reason
    assert "inside subgraph" in by_type["deepseek_v32"].reason and "indexer" in by_type["deepseek_v32"].reason


@pytest.mark.full_walk
def test_every_type_walks_as_the_table_says(committed):
    data, committed_rows = committed
    rows = st.walk(st.causal_lm_types())
    assert [(r.model_type, r.status, r.reason) for r in rows if r.status in BAD] == []
    if _same_transformers(data):
        assert _compare(rows, committed_rows) == []
