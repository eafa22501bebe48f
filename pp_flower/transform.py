"""The maths of training h_θ, shared by the split protocol's user (pp_flower.user) and the in-process reference.

One step of the paper (Sec. III-C) minimises L_trans = L_class(ψ(h_θ(x)), y) − α·L_feat(x, h_θ(x)).
In the split protocol the user never holds ψ or y: the provider returns g = ∂L_class/∂x̂ and the user
back-propagates g + ∂(−α·L_feat)/∂x̂ through h_θ. Autograd graphs cannot cross a message, so
a live user (pp_flower.trainer) keeps the graph of the batch it sent until the gradient arrives; where
it cannot, it recomputes the forward pass (bit-identical: same θ, same input, BatchNorm in training mode
normalises with batch statistics) and restores BatchNorm's running statistics, so they are updated once
per step exactly as in the in-process loss.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.data import augment, to_float
from pp_flower.losses import class_loss, feature_loss, lr_at, transform_loss
from pp_flower.seeds import derive_seed, generator
from pp_flower.wire import straight_through


def user_seed(seed: int, user_index: int) -> int:
    """Each user's own seed (h_θ's initialisation, batch order, augmentation)."""
    return derive_seed(seed, "user", user_index)


def init_transform_net(base: int, depth: int, seed: int, user_index: int, arch: str = "paper"):
    """h_θ at step 0 for a user: a U-Net initialised from the user's seed."""
    from pp_flower.models import UNet

    torch.manual_seed(user_seed(seed, user_index))
    return UNet(base, depth, arch=arch)


def make_optimizer(net: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(opt: torch.optim.Optimizer, epoch: int, epochs: int, base_lr: float) -> float:
    lr = lr_at(epoch, epochs, base_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which a user visits its ``n`` training images in ``epoch``."""
    return torch.randperm(n, generator=generator(seed, "order", epoch))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps in an epoch of ``n`` images: a last batch of a single image is dropped (BatchNorm cannot
    normalise one value per channel, e.g. at a 1×1 U-Net bottleneck); every training loop uses this rule."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or (rest == 1 and batch_size == 1) else 0)


def train_batch(images: torch.Tensor, shard_ids: torch.Tensor, step: int, steps_per_epoch: int, batch_size: int,
                seed: int, do_augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample ids, float images) of training step ``step``: a pure function, so any step can be rebuilt."""
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_order(len(shard_ids), seed, epoch)
    ids = shard_ids[order[k * batch_size:(k + 1) * batch_size]]
    batch = images[ids]
    if do_augment:
        batch = augment(batch, generator(seed, "augment", step))
    return ids, to_float(batch)


def user_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """User side, before the wire: x̂ = h_θ(x) in training mode, no graph (BatchNorm's running statistics are
    updated here, once per step). x: (n, C, H, W) in [0, 1] → x̂: (n, C, H, W) in [0, 1]."""
    net.train()
    with torch.no_grad():
        return net(x)


def user_forward_with_graph(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """User side, before the wire: x̂ = h_θ(x) in training mode, its autograd graph kept until the provider's
    ∂L_class/∂x̂ comes back (a live user)."""
    net.train()
    with torch.enable_grad():
        return net(x)


@contextmanager
def frozen_batchnorm_statistics(net: nn.Module):
    """Run a forward pass of ``net`` that must not count: BatchNorm's running statistics are restored after it.

    A step's forward pass updates them once; a recomputed or repeated forward pass of the same step must not
    update them again (the in-process loss updates them once per step)."""
    saved = {name: buf.clone() for name, buf in net.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in net.named_buffers():
                buf.copy_(saved[name])


def _backward(opt: torch.optim.Optimizer, feature_net: nn.Module, x: torch.Tensor, xhat: torch.Tensor,
              grad_cut: torch.Tensor, alpha: float) -> float:
    """θ's gradient of Eq. (6): ∂L_trans/∂θ = (∂x̂/∂θ)ᵀ (∂L_class/∂x̂ − α ∂L_feat/∂x̂); returns L_feat."""
    with torch.no_grad():
        target = feature_net(x)
    l_feat = feature_loss(feature_net(xhat), target)
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward([xhat, -alpha * l_feat], [grad_cut.to(xhat.device, xhat.dtype), None])
    return l_feat.item()


def feature_gradient(feature_net: nn.Module, x: torch.Tensor, xhat: torch.Tensor, alpha: float
                     ) -> tuple[torch.Tensor, float]:
    """(∂(−α·L_feat)/∂x̂, L_feat) for x̂ as a leaf: the user's own part of Eq. (6), which needs no ψ.

    A live user computes it while the provider works on ψ; adding it to ∂L_class/∂x̂ at x̂ is exactly what
    autograd does with two roots (a sum of two terms does not depend on their order).
    """
    leaf = xhat.detach().requires_grad_(True)
    with torch.no_grad():
        target = feature_net(x)
    l_feat = feature_loss(feature_net(leaf), target)
    (g,) = torch.autograd.grad(-alpha * l_feat, leaf)
    return g, l_feat.item()


def user_backward_kept(opt: torch.optim.Optimizer, xhat: torch.Tensor, grad_cut: torch.Tensor,
                       grad_feature: torch.Tensor) -> None:
    """User side, after the wire: one SGD step of h_θ through the kept graph of x̂ = h_θ(x), from the full
    ∂L_trans/∂x̂ = ∂L_class/∂x̂ (the provider's, applied to x̂ unchanged) + ∂(−α·L_feat)/∂x̂ (Eq. 6)."""
    opt.zero_grad(set_to_none=True)
    xhat.backward(grad_cut.to(xhat.device, xhat.dtype) + grad_feature)
    opt.step()


def user_backward_recomputed(net: nn.Module, opt: torch.optim.Optimizer, feature_net: nn.Module, x: torch.Tensor,
                             grad_cut: torch.Tensor, alpha: float) -> float:
    """User side, after the wire: one SGD step of h_θ after recomputing the forward pass that produced the x̂ the
    provider saw (Eq. 6); returns L_feat.

    For a user whose graph did not survive (a message-per-process runtime, or too little memory to keep it):
    the recomputation is bit-identical, and BatchNorm's running statistics are restored once backward no longer
    needs them, so they are updated once per step, as in the in-process loss.
    """
    with frozen_batchnorm_statistics(net):
        xhat = user_forward_with_graph(net, x)
        l_feat = _backward(opt, feature_net, x, xhat, grad_cut, alpha)
    opt.step()
    return l_feat


def provider_cut_gradients(classifier: nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor],
                           microbatch: int = 0) -> tuple[list[torch.Tensor], list[float]]:
    """Provider side: ψ over all users' x̂ (as received: q/255 under the uint8 wire) together; returns each
    user's ∂L_class/∂x̂ (float32, the shape of its batch) and its L_class (mean cross-entropy, nats).

    ψ is in eval mode (no coupling between samples) and the objective is Σ_u mean-CE_u, i.e. per-sample
    cross-entropies weighted by 1/n_u, so the gradient on user u's images is exactly the gradient of u's own
    mean cross-entropy. ``microbatch`` > 0 splits the pass into chunks of that many images — identical
    results, and faster on CPUs, where one huge batch falls out of cache (see BENCHMARKS.md).
    """
    classifier.eval()
    device = next(classifier.parameters()).device
    x_all = torch.cat(batches).to(device)
    y_all = torch.cat(labels).to(device)
    owner = torch.cat([torch.full((len(y),), u) for u, y in enumerate(labels)]).to(device)
    weight = torch.tensor([1.0 / len(y) for y in labels], device=device)[owner]
    grads, per_sample = [], []
    size = microbatch if microbatch > 0 else len(x_all)
    for start in range(0, len(x_all), size):
        x = x_all[start:start + size].requires_grad_(True)
        ce = F.cross_entropy(classifier(x), y_all[start:start + size], reduction="none")
        (g,) = torch.autograd.grad((ce * weight[start:start + size]).sum(), x)
        grads.append(g.detach())
        per_sample.append(ce.detach())
    grad = torch.cat(grads).cpu()
    ce_all = torch.cat(per_sample).cpu()
    sizes = [len(y) for y in labels]
    losses = [part.mean().item() for part in torch.split(ce_all, sizes)]
    return list(torch.split(grad, sizes)), losses


def reference_step(net: nn.Module, opt: torch.optim.Optimizer, classifier: nn.Module, feature_net: nn.Module,
                   x: torch.Tensor, y: torch.Tensor, alpha: float, *, wire: str) -> tuple[float, float]:
    """One in-process step of Eq. (6), computing L_trans directly — what the split protocol must equal.

    ψ sees x̂ as the provider would receive it under ``wire`` (pp_flower.wire: q/255 for uint8, with the
    straight-through gradient the user applies); L_feat is the user's and uses x̂ itself. Returns (L_class, L_feat).
    """
    net.train()
    classifier.eval()
    xhat = net(x)
    l_class = class_loss(classifier(straight_through(xhat, wire)), y)
    with torch.no_grad():
        target = feature_net(x)
    l_feat = feature_loss(feature_net(xhat), target)
    loss = transform_loss(l_class, l_feat, alpha)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return l_class.item(), l_feat.item()
