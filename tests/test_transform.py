"""The maths of the split protocol, without Flower: it must equal the in-process loss exactly."""

import pytest
import torch

from pp_flower.features import load_feature_net
from pp_flower.losses import feature_loss, lr_at, transform_loss
from pp_flower.models import ResNet20, UNet
from pp_flower import wire as W
from pp_flower.transform import (make_optimizer, provider_cut_gradients, reference_step, user_backward_recomputed,
                                 user_forward)


def _nets():
    torch.manual_seed(1)
    clf = ResNet20().eval().requires_grad_(False)
    torch.manual_seed(2)
    return clf, UNet(base=4, depth=2)


def test_batched_psi_gives_each_user_its_own_gradient():
    clf, _ = _nets()
    xs = [torch.rand(5, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    ys = [torch.randint(0, 10, (5,)), torch.randint(0, 10, (3,))]
    grads, losses = provider_cut_gradients(clf, xs, ys)
    for x, y, g, loss in zip(xs, ys, grads, losses):
        x = x.clone().requires_grad_(True)
        own = torch.nn.functional.cross_entropy(clf(x), y)
        (own_grad,) = torch.autograd.grad(own, x)
        assert torch.allclose(g, own_grad, rtol=1e-4, atol=1e-6)  # float32 summation order only
        assert loss == pytest.approx(own.item(), rel=1e-6)  # float32: relative, the loss can be ≫ 1


def test_microbatched_psi_pass_is_the_same():
    clf, _ = _nets()
    xs = [torch.rand(5, 3, 32, 32), torch.rand(7, 3, 32, 32)]
    ys = [torch.randint(0, 10, (5,)), torch.randint(0, 10, (7,))]
    whole, l1 = provider_cut_gradients(clf, xs, ys)
    chunked, l2 = provider_cut_gradients(clf, xs, ys, microbatch=4)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert l1 == pytest.approx(l2, rel=1e-5)


def _split_vs_in_process(vgg_weights, wire: str, provider_wire: str) -> tuple[dict, dict]:
    """h_θ after 4 steps in-process (ψ fed x̂ as the provider gets it under ``wire``) and 4 split steps in which
    the user sends x̂ on ``provider_wire``."""
    clf, net_a = _nets()
    phi = load_feature_net(vgg_weights)
    net_b = UNet(base=4, depth=2)
    net_b.load_state_dict(net_a.state_dict())
    opt_a, opt_b = (make_optimizer(n, 0.05, 0.9, 5e-4) for n in (net_a, net_b))
    alpha = 0.01
    for _ in range(4):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        reference_step(net_a, opt_a, clf, phi, x, y, alpha, wire=wire)
        sent = W.encode(user_forward(net_b, x), provider_wire)          # user → provider: x̂ only, on the wire
        (g,), _ = provider_cut_gradients(clf, [W.decode(sent)], [y])   # provider → user: ∂L_class/∂x̂ only
        user_backward_recomputed(net_b, opt_b, phi, x, g, alpha)       # user: recompute, add feature term, step
    return net_a.state_dict(), net_b.state_dict()


@pytest.mark.parametrize("wire", W.WIRES)
def test_split_steps_equal_in_process_steps(vgg_weights, wire):
    a_state, b_state = _split_vs_in_process(vgg_weights, wire, wire)
    for (name, a), b in zip(a_state.items(), b_state.values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert a_state["down.0.1.num_batches_tracked"] == 4 == b_state["down.0.1.num_batches_tracked"]


def test_the_wire_matters_to_the_reference(vgg_weights):
    """Guard for the test above: a provider fed float32 x̂ while the reference quantises does not match."""
    a_state, b_state = _split_vs_in_process(vgg_weights, "uint8", "float32")
    assert any(not torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(a_state.values(), b_state.values()))


def test_the_uint8_wire_sends_the_8_bit_image_and_a_quarter_of_the_bytes():
    xhat = torch.rand(4, 3, 32, 32)
    q = W.encode(xhat, "uint8")
    assert q.dtype == torch.uint8 and torch.equal(q, torch.round(xhat * 255).to(torch.uint8))
    assert q.numpy().nbytes * 4 == W.encode(xhat, "float32").numpy().nbytes
    assert torch.equal(W.decode(q), q.float() / 255)
    assert (W.provider_view(xhat, "uint8") - xhat).abs().max() <= 0.5 / 255 + 1e-7
    leaf = xhat.clone().requires_grad_(True)
    seen = W.straight_through(leaf, "uint8")
    assert torch.equal(seen, W.provider_view(xhat, "uint8"))   # the forward is exactly what the provider holds
    seen.mul(torch.arange(4.0).view(4, 1, 1, 1)).sum().backward()
    assert torch.equal(leaf.grad, torch.arange(4.0).view(4, 1, 1, 1).expand_as(xhat))  # straight through
    with pytest.raises(ValueError, match="wire must be one of"):
        W.encode(xhat, "uint16")


def test_recompute_without_bn_restore_would_differ(vgg_weights):
    """Guard for the test above: BatchNorm statistics really do move on a second forward pass."""
    _, net = _nets()
    before = net.down[0][1].running_mean.clone()
    user_forward(net, torch.rand(4, 3, 32, 32))
    assert not torch.allclose(before, net.down[0][1].running_mean)


def test_losses_and_schedule():
    a, b = torch.zeros(2, 4), torch.ones(2, 4)
    assert feature_loss(a, b).item() == 1.0
    assert transform_loss(torch.tensor(2.0), torch.tensor(10.0), 0.1).item() == 1.0
    assert [lr_at(e, 200) for e in (0, 59, 60, 119, 120, 160)] == [0.1, 0.1, 0.1 * 0.2, 0.1 * 0.2, 0.1 * 0.2**2,
                                                                    0.1 * 0.2**3]
