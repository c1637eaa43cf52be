"""Importance of each rank component of each LoRA module, by three estimators.

Component i of a module is row i of A [r, in] with column i of B [out, r]. All three estimators
are read from what a training step already has (the gradients after backward, the module's
input in the forward pass) and smoothed over steps by an exponential moving average:

- "sensitivity" (AdaLoRA's): per weight I = |w * dL/dw|, smoothed I_bar <- b1 I_bar + (1 - b1) I,
  its uncertainty U_bar <- b2 U_bar + (1 - b2) |I - I_bar|; a component scores the mean of
  I_bar * U_bar over its A row plus that over its B column.
- "fisher": the empirical Fisher of the batch gradient: the mean squared gradient over the
  component's A row plus that over its B column, smoothed with b1.
- "activation": the variance of the module's input (mean over features of the variance over the
  step's positions, padding included; `schedule.moment_variance`), smoothed with b1, times the
  component's output energy for inputs of that variance: v s^2 ||A_i||^2 ||B_:,i||^2 (s the
  module's LoRA scaling).

The averages start at zero without bias correction; every module's average carries the same
factor (1 - b^n), so rankings across modules are unaffected.
"""
from __future__ import annotations

import torch

from ..config import IMPORTANCES  # noqa: F401 - defined once, beside the config field it validates


def sensitivity_scores(ipt_a, unc_a, ipt_b, unc_b) -> torch.Tensor:
    """[r] AdaLoRA's component score from the smoothed sensitivity and uncertainty of A [r, in]
    and B [out, r]: mean of their product over A's row i plus over B's column i."""
    return (ipt_a * unc_a).mean(1) + (ipt_b * unc_b).mean(0)


def fisher_scores(grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """[r] mean squared gradient over A's row i [in] plus over B's column i [out]."""
    return grad_a.square().mean(1) + grad_b.square().mean(0)


def activation_scores(var: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """[r] expected squared output of each component for inputs of per-feature variance `var`
    (a scalar tensor), uncorrelated: var s^2 ||A_i||^2 ||B_:,i||^2."""
    return var * scaling**2 * a.square().sum(1) * b.square().sum(0)


class Importance:
    """The moving averages of the three estimators for LoRA `factors` [(A, B)] (live parameters)
    with their `scalings`; `observe` after each backward pass, `scores(kind)` any time."""

    def __init__(self, factors, scalings, beta1: float, beta2: float):
        self.factors, self.scalings, self.beta1, self.beta2 = list(factors), list(scalings), beta1, beta2
        self.ipt = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in self.factors]
        self.unc = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in self.factors]
        self.fisher = [torch.zeros(a.shape[0], device=a.device) for a, _ in self.factors]
        self.var = torch.zeros(len(self.factors), device=self.factors[0][0].device)

    @torch.no_grad()
    def observe(self, var: torch.Tensor) -> None:
        """Take one step's gradients (`.grad` of the factors; None counts as zero) and `var`
        [modules], each module's input variance in that step, into the averages."""
        b1, b2 = self.beta1, self.beta2
        for (a, b), ipt, unc, i in zip(self.factors, self.ipt, self.unc, range(len(self.fisher))):
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in (a, b)]
            for p, g, ipt_p, unc_p in zip((a, b), grads, ipt, unc):
                now = (p * g).abs()
                ipt_p.mul_(b1).add_(now, alpha=1 - b1)
                unc_p.mul_(b2).add_((now - ipt_p).abs(), alpha=1 - b2)
            self.fisher[i].mul_(b1).add_(fisher_scores(*grads), alpha=1 - b1)
        self.var.mul_(b1).add_(var.to(self.var), alpha=1 - b1)

    @torch.no_grad()
    def scores(self, kind: str) -> list[torch.Tensor]:
        """[r] per module: the component scores of estimator `kind` (one of IMPORTANCES)."""
        if kind == "sensitivity":
            return [sensitivity_scores(ia, ua, ib, ub) for (ia, ib), (ua, ub) in zip(self.ipt, self.unc)]
        if kind == "fisher":
            return [f.clone() for f in self.fisher]
        if kind == "activation":
            return [activation_scores(v, a, b, s)
                    for v, (a, b), s in zip(self.var, self.factors, self.scalings)]
        raise ValueError(f"importance {kind!r}: must be one of {IMPORTANCES}")

    def state_dict(self) -> dict:
        return {"ipt": [t.cpu() for ab in self.ipt for t in ab], "unc": [t.cpu() for ab in self.unc for t in ab],
                "fisher": [f.cpu() for f in self.fisher], "var": self.var.cpu()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for mine, saved in ((self.ipt, state["ipt"]), (self.unc, state["unc"])):
                for t, s in zip([t for ab in mine for t in ab], saved):
                    t.copy_(s)
            for f, s in zip(self.fisher, state["fisher"]):
                f.copy_(s)
            self.var.copy_(state["var"])
