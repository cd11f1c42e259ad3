"""compile: a captured graph plus a plan -> a runnable mixed-precision module.

    qmodel = mpqc.compile(graph, plan)
    logits = qmodel(input_ids)          # any batch size and sequence length
    qmodel.set_plan(other_plan)         # new precisions, same graph: no recapture, no recompile
    fast = qmodel.torch_compile()       # torch.compile; plan switches do not recompile it (see quantizers)

The graph is copied (parameters shared, never modified), quantizers are inserted once by
``InsertQuantizers``, and a plan only configures them. Quantized weights are cached per
(weight, format, rounding), so going back to a format seen before costs nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpqc.graph import Graph, weight_tensor
from mpqc.passes.transform.insert_quantizers import InsertQuantizers
from mpqc.plan import Plan
from mpqc.quantizers import WeightCache


class QuantizedModel(nn.Module):
    """The captured model with quantizers on every matmul operand, configured by a plan."""

    def __init__(self, graph: Graph, plan: Plan):
        super().__init__()
        self.graph = graph
        # A new GraphModule over a copy of the graph: the captured one stays as it was.
        self.module = torch.fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph))
        self.weight_cache = WeightCache()
        self._inserted = InsertQuantizers(graph, self.weight_cache)
        self._inserted(self.module)
        # Each quantized matmul's weight, looked up once: set_plan runs per search trial.
        self._weights = {
            name: weight_tensor(self.module, self.graph.matmul(name).weight)
            for name in self._inserted.weight_quantizers
        }
        self.plan: Plan | None = None
        # Activation formats any plan has asked for (None: unquantized), shared by every
        # activation quantizer: a torch.compile'd forward recompiles only when this grows.
        self._activation_candidates: tuple = (None,)
        self.set_plan(plan)

    def add_activation_formats(self, formats) -> None:
        """Declare activation formats that later plans will use (a search: its low and high).

        Under ``torch.compile`` each new activation format costs one recompile, whenever it
        first appears; declaring them before the first compiled forward makes that zero.
        Eager forwards do not depend on this."""
        if self._grow_candidates(formats) and self.plan is not None:
            for aq in self._inserted.activation_quantizers:
                aq.configure(aq.formats, aq.rounding, self._activation_candidates)

    def _grow_candidates(self, formats) -> bool:
        """Append the formats not yet among the candidates; whether any were new."""
        new = [f for f in dict.fromkeys(formats) if f not in self._activation_candidates]
        self._activation_candidates += tuple(new)
        return bool(new)

    def set_plan(self, plan: Plan) -> QuantizedModel:
        """Switch every quantizer to ``plan``'s formats; weights come from the cache when seen before."""
        if not isinstance(plan, Plan):
            raise TypeError(f"set_plan takes a mpqc.Plan, got {type(plan).__name__}")
        if plan.graph is not self.graph:
            raise ValueError(
                f"the plan was made for another captured graph ({plan.graph!r}); build it with "
                "Plan(qmodel.graph, ...) or Plan.from_json(qmodel.graph, text)"
            )
        for name, wq in self._inserted.weight_quantizers.items():
            wq.configure(plan.weight_format(self.graph.matmul(name)), plan.rounding, self._weights[name])
        per_quantizer = [
            [plan.activation_format(self.graph.matmul(n)) for n in aq.consumers]
            for aq in self._inserted.activation_quantizers
        ]
        self._grow_candidates(f for formats in per_quantizer for f in formats)  # configured just below
        for aq, formats in zip(self._inserted.activation_quantizers, per_quantizer):
            aq.configure(formats, plan.rounding, self._activation_candidates)
        self.plan = plan
        return self

    def torch_compile(self, backend="inductor", **kwargs):
        """``torch.compile(self)`` with the settings that keep a compiled forward honest.

        Inductor keeps the intermediates of a 16-bit model in float32 unless told to round
        them as eager does (``emulate_precision_casts``); a quantizer then sees values a few
        ulps away from eager's, and rounds some of them to another grid point, so a bf16
        model's plans would score differently compiled and eager. With it, Inductor's bf16
        forward matches eager bit for bit on the tiny test models (tests/test_torch_compile.py).
        """
        if backend == "inductor":
            kwargs["options"] = {"emulate_precision_casts": True, **kwargs.get("options", {})}
        return torch.compile(self, backend=backend, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.device != self.graph.device:
            raise ValueError(
                f"input_ids are on {input_ids.device}, the model on {self.graph.device}: "
                f"move them with input_ids.to({str(self.graph.device)!r})"
            )
        return self.module(input_ids)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() and the like end here. The captured graph holds its
        # device and dtype (see Graph), and cached quantized weights would stay behind, so
        # a move is refused with what to do instead; a no-op conversion passes.
        probe = fn(torch.empty(0, dtype=self.graph.dtype, device=self.graph.device))
        if (probe.device, probe.dtype) != (self.graph.device, self.graph.dtype):
            raise ValueError(
                f"a compiled model runs where its graph was captured ({self.graph.device}, {self.graph.dtype}), "
                f"not on ({probe.device}, {probe.dtype}): load the model there, e.g. "
                f"mpqc.load_model(..., device={str(probe.device)!r}, dtype={probe.dtype}), capture it and "
                "compile again"
            )
        return super()._apply(fn, recurse)

    def weight(self, matmul: str) -> torch.Tensor:
        """The (unquantized) weight tensor of the matmul named ``matmul``."""
        return self._weights[matmul]

    @property
    def weight_quantizers(self):
        """Matmul name -> the WeightQuantizer in front of its weight."""
        return dict(self._inserted.weight_quantizers)

    @property
    def activation_quantizers(self):
        """The ActivationQuantizers, each serving the matmuls named in its ``consumers``."""
        return list(self._inserted.activation_quantizers)


def compile(graph: Graph, plan: Plan) -> QuantizedModel:  # noqa: A001 - the verb of the API
    """A module computing ``graph``'s logits with ``plan``'s precisions."""
    if not isinstance(graph, Graph):
        raise TypeError(f"compile takes a graph from mpqc.capture, got {type(graph).__name__}")
    return QuantizedModel(graph, plan)
