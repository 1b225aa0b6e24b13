"""Attribution values against Captum, and their input-derivatives against finite differences."""

import captum.attr
import pytest
import torch
from torch import nn

from robustattr.attributions import (
    DeepLift,
    GradientShap,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    Saliency,
    SmoothGrad,
    UniformGradient,
)
from robustattr.errors import ConfigError
from robustattr.models import SmallCNN


@pytest.fixture(scope="module")
def smooth_net():
    torch.manual_seed(0)
    return SmallCNN(width=8, activation=lambda: nn.Softplus(beta=3)).double().eval()


@pytest.fixture(scope="module")
def relu_net():
    torch.manual_seed(1)
    return SmallCNN(width=8).eval()


def _batch(dtype=torch.float64, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.tensor([0, 3, 5, 9][:n])


def test_saliency_and_gradient_x_input_equal_captum(smooth_net):
    x, t = _batch()
    ours = Saliency()(smooth_net, x, t)
    theirs = captum.attr.Saliency(smooth_net).attribute(x.clone().requires_grad_(), target=t, abs=False)
    torch.testing.assert_close(ours, theirs)
    ours = GradientXInput()(smooth_net, x, t)
    theirs = captum.attr.InputXGradient(smooth_net).attribute(x.clone().requires_grad_(), target=t)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_integrated_gradients_equal_captum_riemann_right_in_any_chunking(smooth_net, chunk):
    x, t = _batch()
    ours = IntegratedGradients(steps=50, chunk=chunk)(smooth_net, x, t)
    theirs = captum.attr.IntegratedGradients(smooth_net).attribute(
        x.clone(), baselines=0.0, target=t, n_steps=50, method="riemann_right"
    )
    torch.testing.assert_close(ours, theirs)


def test_integrated_gradients_completeness_on_softmax_output(smooth_net):
    x, t = _batch()
    ig = IntegratedGradients(steps=300, output="softmax")
    attr = ig(smooth_net, x, t)
    with torch.no_grad():
        p = smooth_net(x).softmax(1).gather(1, t[:, None]).squeeze(1)
        p0 = smooth_net(torch.zeros_like(x)).softmax(1).gather(1, t[:, None]).squeeze(1)
    total = attr.sum(dim=(1, 2, 3))
    torch.testing.assert_close(total, p - p0, atol=0.05 * (p - p0).abs().max().item(), rtol=0)


def test_smoothgrad_matches_captum_noise_tunnel_in_expectation(smooth_net):
    x, t = _batch(n=2)
    ours = SmoothGrad(samples=3000, sigma=0.15, chunk=500)(smooth_net, x, t)
    tunnel = captum.attr.NoiseTunnel(captum.attr.Saliency(smooth_net))
    torch.manual_seed(0)
    theirs = tunnel.attribute(
        x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=3000, nt_samples_batch_size=500,
        stdevs=0.15, target=t, abs=False,
    )  # fmt: skip
    # Two Monte-Carlo estimates with independent noise: equal up to sampling error.
    scale = theirs.abs().mean()
    assert (ours - theirs).abs().mean() < 0.05 * scale
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.99


def test_noise_methods_are_seeded_and_uniform_gradient_averages_gradients(smooth_net):
    x, t = _batch()
    ug = UniformGradient(samples=20, radius=0.2)
    torch.testing.assert_close(ug(smooth_net, x, t), ug(smooth_net, x, t))
    assert not torch.equal(ug(smooth_net, x, t), UniformGradient(samples=20, seed=1)(smooth_net, x, t))
    tiny = UniformGradient(samples=4, radius=1e-9)(smooth_net, x, t)
    torch.testing.assert_close(tiny, Saliency()(smooth_net, x, t), atol=1e-6, rtol=1e-5)


METHODS = [
    Saliency(),
    GradientXInput(),
    IntegratedGradients(steps=8, chunk=3),
    IntegratedGradients(steps=8, output="softmax"),
    SmoothGrad(samples=6, chunk=4),
    UniformGradient(samples=6, chunk=4),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_input_derivative_of_attribution_matches_finite_differences(smooth_net, method):
    """d/dx <w, A(x)> by double backprop equals a central finite difference along a random direction."""
    x, t = _batch(n=2)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(x.shape, generator=g, dtype=x.dtype)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def phi(z):
        return (w * method(smooth_net, z, t, create_graph=True)).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(phi(xr), xr)
    h = 1e-5
    with torch.no_grad():
        fd = (phi(x + h * v) - phi(x - h * v)) / (2 * h)
    assert (grad * v).sum().item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-8)


def test_attributions_work_under_inference_mode(smooth_net):
    x, t = _batch()
    expected = Saliency()(smooth_net, x, t)
    with torch.inference_mode():
        xi = x.clone()
        got = Saliency()(smooth_net, xi, t)
    torch.testing.assert_close(got, expected)


def test_captum_adapters_give_the_same_call_and_refuse_create_graph(relu_net):
    x, t = _batch(dtype=torch.float32)
    dl = DeepLift()(relu_net, x, t)
    assert dl.shape == x.shape
    with torch.no_grad():  # DeepLIFT's summation-to-delta: sum A = f(x) - f(x0)
        delta = relu_net(x).gather(1, t[:, None]).squeeze(1) - relu_net(torch.zeros_like(x)).gather(
            1, t[:, None]
        ).squeeze(1)
    torch.testing.assert_close(dl.sum(dim=(1, 2, 3)), delta, atol=1e-4, rtol=1e-4)
    gs = GradientShap(samples=10)
    torch.testing.assert_close(gs(relu_net, x, t), gs(relu_net, x, t))  # seeded
    occ = Occlusion(window=2, stride=2)(relu_net, x, t)
    assert occ.shape == x.shape
    with pytest.raises(ConfigError, match="not differentiable"):
        DeepLift()(relu_net, x, t, create_graph=True)
