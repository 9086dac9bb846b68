"""FracBits' model during its search: the quantized network with learnable (fractional)
bit-widths per layer or per filter, the penalty on their cost, and their discretisation
(Yang & Jin, AAAI 2021; the strategy and its task are in :mod:`.fracbits`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from qsearch.actquant import PACTActQuant
from qsearch.candidate import Candidate
from qsearch.qlayers import quantize_model
from qsearch.tasks import TaskContext

from ._fracbits_cost import FracCost, discretise

if TYPE_CHECKING:
    from .fracbits import FracBitsConfig

# Penalty units (paper Sec. "Resource constraint as penalty loss"): MB and GBitOPs.
UNIT = {"size": 8e6, "bitops": 1e9}


class FracBitsRun:
    """The quantized model with its learnable bit-widths, penalty and discretisation."""

    def __init__(self, ctx: TaskContext, cfg: FracBitsConfig):
        space, budget = ctx.space, ctx.budget
        self.space, self.kind, self.target = space, budget.kind, budget.value
        self.kernel_wise = cfg.kernel_wise
        self.kappa = cfg.kappa_for(budget.kind)
        self.lo, self.hi = cfg.range_for(budget.kind)
        self.width = cfg.reference(space, budget).width
        self.cost = FracCost(space, self.width, budget.kind, kernel_wise=cfg.kernel_wise)
        self.b_t = self.cost.uniform_bits(self.target, self.lo, self.hi)
        init = min(float(self.hi), self.b_t + cfg.init_offset)

        torch.manual_seed(ctx.seed)
        self.model = ctx.build(self.width)
        modules = dict(self.model.named_modules())
        self.free = [space.layers[i].name for i in space.free_layers]
        self.w_params = [
            nn.Parameter(torch.full((modules[n].weight.shape[0],) if cfg.kernel_wise else (),
                                    init)) for n in self.free]
        bits: dict[str, Any] = {space.layers[i].name: b for i, b in space.pinned.items()}
        bits.update(zip(self.free, self.w_params))
        self.a_param = nn.Parameter(torch.tensor(init)) if self.kind == "bitops" else None
        quantize_model(self.model, bits, self.a_param if self.a_param is not None
                       else space.a_bits, scheme="dorefa")
        self.pact = [m for m in self.model.modules() if isinstance(m, PACTActQuant)]
        self.model.to(ctx.device)  # moves the shared bit-width Parameters in place
        self.discrete: dict | None = None  # {"w": unit bits, "a": activation bits}

    # ----- bits
    def bit_params(self) -> list:
        return self.w_params + ([self.a_param] if self.a_param is not None else [])

    def lam_w(self):
        return torch.cat([p.reshape(-1) for p in self.w_params])

    def penalty(self):
        """kappa x |cost - target| in MB or GBitOPs, Eq. (6a)/(6b) and (7a)/(7b)."""
        return self.kappa * (self.cost(self.lam_w(), self.a_param) - self.target).abs() \
            / UNIT[self.kind]

    def clamp_(self) -> None:
        with torch.no_grad():
            for p in self.bit_params():
                p.clamp_(self.lo, self.hi)

    def unit_bits(self) -> tuple[np.ndarray, float | None]:
        """Current bit-widths: learned (fractional) or, after discretisation, the integers."""
        if self.discrete is not None:
            return np.asarray(self.discrete["w"], float), self.discrete["a"]
        w = self.lam_w().detach().double().cpu().numpy()
        a = float(self.a_param.detach()) if self.a_param is not None else None
        return w, a

    def layer_bits(self) -> list[float]:
        """Bits of every layer in inventory order (kernel-wise: mean over filters)."""
        out = [float(self.space.pinned.get(i, 0)) for i in range(len(self.space.layers))]
        for li, bits in zip(self.space.free_layers, self.cost.per_layer(self.unit_bits()[0])):
            out[li] = float(np.mean(bits))
        return out

    # ----- discretisation
    def discretise(self) -> None:
        w, a = self.unit_bits()
        w_int, a_int, _ = discretise(self.cost, w, a, self.target, self.lo, self.hi)
        self.set_discrete({"w": [int(b) for b in w_int], "a": a_int,
                           "searched_bits": self.layer_bits(), "searched_a": a})

    def set_discrete(self, discrete: dict) -> None:
        """Swap the learnable bit-widths for integers (modules keep weights and state)."""
        self.discrete = discrete
        modules = dict(self.model.named_modules())
        for name, chunk in zip(self.free, self.cost.per_layer(discrete["w"])):
            m = modules[name]
            del m.w_bits  # a registered Parameter until now
            m.w_bits = (torch.tensor(chunk, dtype=torch.float32, device=m.weight.device)
                        if self.kernel_wise else int(chunk[0]))
        if discrete["a"] is not None:
            for q in self.pact:
                del q.bits
                q.bits = int(discrete["a"])
        for p in self.bit_params():
            p.requires_grad_(False)
            p.grad = None

    def candidate(self) -> tuple[Candidate, dict]:
        """The discretised candidate and, kernel-wise, the per-filter bits and their costs."""
        w, a = np.asarray(self.discrete["w"], float), self.discrete["a"]
        a_bits = self.space.a_bits if a is None else a
        extra: dict[str, Any] = {}
        if self.kernel_wise:
            kernel_bits = [[int(b) for b in bits] for bits in self.cost.per_layer(w)]
            kernel_cost = float(self.cost(w, a))
            extra = {"kernel_bits": kernel_bits, "kernel_cost": kernel_cost,
                     "kernel_budget_ratio": kernel_cost / self.target}
            # the layer-wise projection: discretise the per-layer mean bits, activations kept
            layer_cost = FracCost(self.space, self.width, self.kind, a_bits=a_bits)
            means = np.array([np.mean(k) for k in kernel_bits])
            w, _, _ = discretise(layer_cost, means, None, self.target, self.lo, self.hi)
        return self.space.candidate([int(b) for b in w], width=self.width, a_bits=a_bits), extra
