"""The maths of the split protocol, without Flower: it must equal the in-process loss exactly."""

import pytest
import torch

from pp_flower.features import load_feature_net
from pp_flower.losses import feature_loss, lr_at, transform_loss
from pp_flower.models import ResNet20, UNet
from pp_flower.transform import apply_class_gradient, class_gradients, make_optimizer, produce, reference_step


def _nets():
    torch.manual_seed(1)
    clf = ResNet20().eval().requires_grad_(False)
    torch.manual_seed(2)
    return clf, UNet(base=4, depth=2)


def test_batched_psi_gives_each_user_its_own_gradient():
    clf, _ = _nets()
    xs = [torch.rand(5, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    ys = [torch.randint(0, 10, (5,)), torch.randint(0, 10, (3,))]
    grads, losses = class_gradients(clf, xs, ys)
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
    whole, l1 = class_gradients(clf, xs, ys)
    chunked, l2 = class_gradients(clf, xs, ys, microbatch=4)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_split_steps_equal_in_process_steps(vgg_weights):
    clf, net_a = _nets()
    phi = load_feature_net(vgg_weights)
    net_b = UNet(base=4, depth=2)
    net_b.load_state_dict(net_a.state_dict())
    opt_a, opt_b = (make_optimizer(n, 0.05, 0.9, 5e-4) for n in (net_a, net_b))
    alpha = 0.01
    for step in range(4):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        reference_step(net_a, opt_a, clf, phi, x, y, alpha)
        xhat = produce(net_b, x)                              # user → provider: x̂ only
        (g,), _ = class_gradients(clf, [xhat], [y])           # provider → user: ∂L_class/∂x̂ only
        apply_class_gradient(net_b, opt_b, phi, x, g, alpha)  # user: recompute, add feature term, step
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert net_a.state_dict()["down.0.1.num_batches_tracked"] == 4 == net_b.state_dict()["down.0.1.num_batches_tracked"]


def test_recompute_without_bn_restore_would_differ(vgg_weights):
    """Guard for the test above: BatchNorm statistics really do move on a second forward pass."""
    _, net = _nets()
    before = net.down[0][1].running_mean.clone()
    produce(net, torch.rand(4, 3, 32, 32))
    assert not torch.allclose(before, net.down[0][1].running_mean)


def test_losses_and_schedule():
    a, b = torch.zeros(2, 4), torch.ones(2, 4)
    assert feature_loss(a, b).item() == 1.0
    assert transform_loss(torch.tensor(2.0), torch.tensor(10.0), 0.1).item() == 1.0
    assert [lr_at(e, 200) for e in (0, 59, 60, 119, 120, 160)] == [0.1, 0.1, 0.1 * 0.2, 0.1 * 0.2, 0.1 * 0.2**2,
                                                                    0.1 * 0.2**3]
