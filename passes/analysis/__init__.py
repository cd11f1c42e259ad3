"""Analysis passes: each writes facts into ``node.meta["mpqc"]`` and changes nothing else.

Order (each pass's ``requires`` checks that the earlier ones ran):
FindMatmuls -> AssignLayers -> AssignRoles -> NameMatmuls -> ComputeCosts -> AssignComponents
-> CheckWeightOperands (writes nothing: it raises unless every weight that reaches a matmul
is that matmul's weight operand, and the matmuls' parameters add up).
The resulting keys on every matmul node are listed in ``mpqc.graph.MATMUL_META_KEYS``.
"""

from __future__ import annotations

import torch

from ._common import AnalysisError, AnalysisPass, matmul_nodes
from .components import AssignComponents
from .costs import ComputeCosts
from .find_matmuls import FindMatmuls
from .layers import AssignLayers
from .names import NameMatmuls
from .roles import AssignRoles
from .weight_operands import CheckWeightOperands, WeightOperandError

__all__ = [
    "AnalysisError",
    "AnalysisPass",
    "AssignComponents",
    "AssignLayers",
    "AssignRoles",
    "CheckWeightOperands",
    "ComputeCosts",
    "FindMatmuls",
    "NameMatmuls",
    "WeightOperandError",
    "analysis_passes",
    "matmul_nodes",
    "run_analysis",
]


def analysis_passes(
    *,
    prefix: str | None = None,
    reference_batch_size: int | None = None,
    reference_seq_len: int | None = None,
) -> list[AnalysisPass]:
    """The analysis passes in the order they must run."""
    return [
        FindMatmuls(),
        AssignLayers(),
        AssignRoles(),
        NameMatmuls(prefix),
        ComputeCosts(reference_batch_size, reference_seq_len),
        AssignComponents(),
        CheckWeightOperands(),
    ]


def run_analysis(graph_module: torch.fx.GraphModule, **options) -> torch.fx.GraphModule:
    """Run every analysis pass on ``graph_module`` (annotating it in place) and return it."""
    for p in analysis_passes(**options):
        p(graph_module)
    return graph_module
