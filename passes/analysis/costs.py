"""ComputeCosts: weight parameters and multiply-accumulates per token of every matmul.

Parameters: the elements of the matmul's weight. A weight several matmuls multiply by
(or that two FQNs alias, like a tied lm_head and embedding) is counted once, by the
first matmul in graph order; later ones record ``params=0`` and ``shares_weight_with``.
The embedding itself is a lookup, not a matmul, so a tied lm_head owns its elements.

MACs: every matmul computes ``numel(output) * K`` multiply-accumulates, K being the
reduced size. The export recorded each shape symbolically in the batch and sequence
sizes of input_ids; they are evaluated at the reference batch size and sequence
length and divided by the number of tokens. That is constant per token for weight
matmuls (out * in; top_k * out * in for routed experts), and grows with the sequence
length for the attention matmuls (heads * seq * head_dim: the dense count, as the
matmul computes masked entries too).
"""

from __future__ import annotations

import math

import sympy
import torch

from mpqc.graph import weight_tensor

from ._common import AnalysisError, AnalysisPass, PassResult, input_placeholder, matmul_nodes, mpqc_meta, shape_of


def _reference_substitution(gm: torch.fx.GraphModule, batch: int | None, seq: int | None) -> tuple[dict, int, int]:
    """Map the input's symbolic batch/sequence sizes to reference values; returns (substitution, batch, seq)."""
    ids = input_placeholder(gm)
    shape = shape_of(ids)
    if shape is None or len(shape) != 2:
        raise AnalysisError(f"input placeholder {ids.name!r} should be input_ids [batch, seq], got shape {shape}")
    subs, ref = {}, []
    for dim, size, want in zip(("batch", "seq"), shape, (batch, seq)):
        if isinstance(size, torch.SymInt):
            value = want if want is not None else size.node.hint
            if value is None:
                raise AnalysisError(f"the {dim} size of input_ids is symbolic without a hint; pass its reference value")
            subs[size.node.expr] = sympy.Integer(int(value))
            ref.append(int(value))
        else:
            if want is not None and want != size:
                raise AnalysisError(
                    f"the graph was captured with a static {dim} size {size}, so costs cannot be "
                    f"counted at {dim}={want}; capture with dynamic=True or use {dim}={size}"
                )
            ref.append(int(size))
    return subs, ref[0], ref[1]


def _evaluate(size, subs: dict, what: str) -> int:
    if isinstance(size, int):
        return size
    value = size.node.expr.xreplace(subs)
    if value.free_symbols:
        raise AnalysisError(
            f"{what}: size {size} depends on {value.free_symbols} beyond the input's batch and sequence"
        )
    return int(value)


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of the elements a tensor holds, so aliases (tied weights) compare equal."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class ComputeCosts(AnalysisPass):
    """Write ``params``, ``shares_weight_with``, ``macs_per_token`` and ``reference_seq_len``.

    ``reference_batch_size`` and ``reference_seq_len`` default to the sizes of the
    example input the graph was exported with.
    """

    needs = ("matmul", "name", "operands", "weight")
    provides = ("params", "shares_weight_with", "macs_per_token", "reference_seq_len")

    def __init__(self, reference_batch_size: int | None = None, reference_seq_len: int | None = None):
        for label, v in (("reference_batch_size", reference_batch_size), ("reference_seq_len", reference_seq_len)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        self.reference_batch_size = reference_batch_size
        self.reference_seq_len = reference_seq_len

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        gm = graph_module
        subs, batch, seq = _reference_substitution(gm, self.reference_batch_size, self.reference_seq_len)
        owners: dict[tuple, str] = {}
        for node in matmul_nodes(gm):
            meta = mpqc_meta(node)
            params, shared = 0, None
            if meta["weight"] is not None:
                t = weight_tensor(gm, meta["weight"])
                key = _storage_key(t)
                if key in owners:
                    shared = owners[key]
                else:
                    owners[key] = meta["name"]
                    params = t.numel()
            out_shape, a_shape = shape_of(node), shape_of(node.args[meta["operands"][0]])
            if out_shape is None or a_shape is None:
                raise AnalysisError(f"matmul node {node.name!r} lacks recorded shapes (meta['val'])")
            what = f"matmul {meta['name']!r}"
            macs = math.prod(_evaluate(s, subs, what) for s in out_shape) * _evaluate(a_shape[-1], subs, what)
            tokens = batch * seq
            if macs % tokens:
                raise AnalysisError(f"{what}: {macs} MACs at batch={batch}, seq={seq} is not a whole number per token")
            meta.update(params=params, shares_weight_with=shared, macs_per_token=macs // tokens, reference_seq_len=seq)
        return PassResult(gm, False)
