"""What travels from the user to the provider: x̂ as an 8-bit image (default) or as float32.

The paper's provider receives protected *images* (the authors' attacker trains on h_θ's outputs saved as 8-bit
PNGs). Under ``wire="uint8"`` the user sends q = round(255·x̂) (uint8, a quarter of float32's bytes); the provider
runs ψ on q/255 and returns ∂L_class/∂(q/255), which the user applies to x̂ unchanged (straight-through: the
rounding's derivative is taken as 1). Under ``wire="float32"`` the provider gets x̂ itself, from which
logit(x̂) gives back h_θ's pre-sigmoid output z exactly wherever z < ≈16.6 — strictly more than an image
(docs/threat-model.md).

Every function takes and returns tensors of shape (n, C, H, W); floats are in [0, 1].
"""

from __future__ import annotations

import torch

WIRES = ("uint8", "float32")
DEFAULT = "uint8"


def check_wire(wire: str) -> str:
    """``wire`` itself; ValueError naming the choices for anything else."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")
    return wire


def encode(xhat: torch.Tensor, wire: str) -> torch.Tensor:
    """The tensor the user sends: uint8 q = round(255·x̂) (round half to even, torch.round) or float32 x̂."""
    check_wire(wire)
    xhat = xhat.detach().float()
    if wire == "float32":
        return xhat
    return torch.round(xhat.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def decode(sent: torch.Tensor) -> torch.Tensor:
    """What the provider feeds ψ: q/255 for uint8, the tensor itself for float32 (both float32 in [0, 1])."""
    if sent.dtype == torch.uint8:
        return sent.float() / 255.0
    return sent.float()


def provider_view(xhat: torch.Tensor, wire: str) -> torch.Tensor:
    """decode(encode(x̂)): exactly the float tensor the provider holds for x̂ under ``wire`` (no graph)."""
    return decode(encode(xhat, wire)).to(xhat.device)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat: torch.Tensor, wire: str) -> torch.Tensor:  # exactly provider_view, not x̂ + (v − x̂)
        return provider_view(xhat, wire).to(xhat.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(xhat: torch.Tensor, wire: str) -> torch.Tensor:
    """The provider's view of x̂ with x̂'s graph: forward = provider_view(x̂) bit for bit, ∂/∂x̂ = identity.

    The in-process reference feeds ψ this, so its loss and gradient equal the split protocol's.
    """
    if check_wire(wire) == "float32":
        return xhat
    return _StraightThrough.apply(xhat, wire)


def logit(xhat: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """log(x̂ / (1 − x̂)): h_θ's pre-sigmoid output, recoverable from a float32 x̂ (an attacker's input)."""
    x = xhat.float().clamp(eps, 1.0 - eps)
    return torch.log(x) - torch.log1p(-x)
