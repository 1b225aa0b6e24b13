"""Regularisers against slow exact references on tiny smooth networks (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from robustattr.errors import ConfigError
from robustattr.models import SmallCNN
from robustattr.regularizers import (
    CURE,
    SSR,
    GradientNorm,
    HessianNorm,
    IGNorm,
    integrated_loss_gradients,
    loss_hvp,
)


def tiny(activation=lambda: nn.Softplus(beta=2.0), batch_norm=False, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4, activation=activation, batch_norm=batch_norm).double().eval()


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.tensor([1, 4, 7, 2, 5][:n])


def sample_hessian(net, x, y, i):
    """The exact input Hessian of CE_i, (d, d)."""
    d = x[i].numel()

    def loss(flat):
        return F.cross_entropy(net(flat.view(1, *x.shape[1:])), y[i : i + 1])

    return hessian(loss, x[i].reshape(-1)).reshape(d, d)


def sample_gauss_newton(net, x, i):
    """J^T (diag p - p p^T) J for sample i, J the logit Jacobian, (d, d)."""
    d = x[i].numel()
    jac = jacobian(lambda flat: net(flat.view(1, *x.shape[1:]))[0], x[i].reshape(-1))  # (C, d)
    p = net(x[i : i + 1]).softmax(1)[0]
    a = torch.diag(p) - torch.outer(p, p)
    return (jac.T @ a @ jac).reshape(d, d)


def test_gradient_norm_value():
    net, (x, y) = tiny(), batch()
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)
    expected = 0.5 * g.flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(GradientNorm()(net, x, y), expected)


@pytest.mark.parametrize("mode", ["reverse", "forward", "finite_difference"])
def test_hessian_vector_products_equal_the_explicit_hessian(mode):
    net, (x, y) = tiny(), batch()
    v = torch.randn_like(x)
    hv = loss_hvp(net, x, y, v, mode=mode, create_graph=False, fd_step=1e-6)
    for i in range(len(x)):
        expected = sample_hessian(net, x, y, i) @ v[i].reshape(-1)
        tolerance = {"rtol": 1e-4, "atol": 1e-6} if mode == "finite_difference" else {}
        torch.testing.assert_close(hv[i].reshape(-1), expected, **tolerance)


def test_forward_over_reverse_refuses_to_keep_a_graph():
    net, (x, y) = tiny(), batch()
    with pytest.raises(ValueError, match="cannot be differentiated"):
        loss_hvp(net, x, y, torch.randn_like(x), mode="forward", create_graph=True)


def test_hessian_norm_with_reverse_products_on_batchnorm_explains_the_missing_third_derivative():
    net, (x, y) = tiny(batch_norm=True), batch()
    net.train()
    with pytest.raises(ConfigError, match="third derivatives"):
        HessianNorm(hvp="reverse")(net, x, y)


def test_hessian_norms_against_eigvalsh():
    net, (x, y) = tiny(), batch()
    hs = [sample_hessian(net, x, y, i) for i in range(len(x))]
    spectral = torch.stack([torch.linalg.eigvalsh(h).abs().max() for h in hs]).mean()
    frobenius_sq = torch.stack([h.pow(2).sum() for h in hs]).mean()
    got = HessianNorm(norm="spectral", power_iters=200, seed=0)(net, x, y)
    torch.testing.assert_close(got, spectral, rtol=1e-4, atol=0)
    estimate = HessianNorm(norm="frobenius", probes=2000, seed=0)(net, x, y)
    torch.testing.assert_close(estimate, frobenius_sq, rtol=0.05, atol=0)  # Hutchinson: unbiased, sampled


@pytest.mark.parametrize("method", ["exact", "power"])
def test_ssr_is_the_top_eigenvalue_of_the_gauss_newton_hessian(method):
    net, (x, y) = tiny(), batch()
    expected = torch.stack([torch.linalg.eigvalsh(sample_gauss_newton(net, x, i))[-1] for i in range(len(x))])
    torch.manual_seed(0)
    got = SSR(method=method, power_iters=100)(net, x, y)
    torch.testing.assert_close(got, expected.mean(), rtol=1e-6, atol=1e-12)


def test_ssr_exact_and_power_iteration_agree():
    net, (x, y) = tiny(seed=3), batch(seed=3)
    torch.manual_seed(0)
    torch.testing.assert_close(SSR(method="power", power_iters=60)(net, x, y), SSR(method="exact")(net, x, y))


def test_on_relu_networks_the_loss_hessian_is_its_gauss_newton_part():
    """What the ReLU warning says: the logits have no curvature, so H = J^T (diag p - p p^T) J exactly."""
    net, (x, y) = tiny(activation=nn.ReLU), batch()
    for i in range(len(x)):
        torch.testing.assert_close(sample_hessian(net, x, y, i), sample_gauss_newton(net, x, i))


def test_linear_model_has_zero_logit_curvature_and_gauss_newton_loss_curvature():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 10)).double()
    x, y = batch()
    v = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xr)[:, 3].sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), xr, allow_unused=True)
    assert hv is None or hv.abs().max() == 0  # every logit is linear: zero curvature
    # The loss Hessian is exactly W^T (diag p - p p^T) W: SSR equals the spectral Hessian norm.
    torch.testing.assert_close(
        SSR(method="exact")(net, x, y),
        HessianNorm(norm="spectral", power_iters=300, seed=0)(net, x, y),
        rtol=1e-5,
        atol=0,
    )


def test_cure_is_a_finite_difference_hessian_vector_product_for_small_h():
    net, (x, y) = tiny(), batch()
    h = 1e-4
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)
    z = g.sign() / g.sign().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    hz = loss_hvp(net, x, y, z, create_graph=False)
    expected = h**2 * hz.flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(CURE(h=h)(net, x, y), expected, rtol=1e-3, atol=0)


def test_integrated_loss_gradients_are_complete():
    """IG of the loss along x -> x': sum IG ~ CE(x') - CE(x)."""
    net, (x, y) = tiny(), batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ig = integrated_loss_gradients(net, x, x_adv, y, steps=400).flatten(1).sum(1)
    with torch.no_grad():
        delta = F.cross_entropy(net(x_adv), y, reduction="none") - F.cross_entropy(net(x), y, reduction="none")
    torch.testing.assert_close(ig.detach(), delta, rtol=0.01, atol=1e-6)


DETERMINISTIC_TERMS = [
    GradientNorm(),
    CURE(h=0.5),
    SSR(method="exact"),
    SSR(method="exact", channel_mean=True),
    HessianNorm(norm="frobenius", probes=2, seed=0),
    HessianNorm(norm="frobenius", probes=1, hvp="finite_difference", seed=0),
    HessianNorm(norm="spectral", power_iters=300, seed=0),
    HessianNorm(norm="spectral", power_iters=300, hvp="forward", seed=0),
]


@pytest.mark.parametrize("term", DETERMINISTIC_TERMS, ids=repr)
def test_penalty_parameter_gradients_match_finite_differences(term):
    net, (x, y) = tiny(), batch()
    params = list(net.parameters())
    value = term(net, x, y)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True) if gr is not None)
    h = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * h * d)
        out = term(net, x, y).detach()
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * h * d)
        return out

    numeric = (shifted(1) - shifted(-1)) / (2 * h)
    assert analytic.item() == pytest.approx(numeric.item(), rel=2e-3, abs=1e-9)


PENALTIES = [
    *DETERMINISTIC_TERMS,
    SSR(method="power", power_iters=3),
    IGNorm(attack_steps=2, ig_steps=3, attack_ig_steps=2),
    IGNorm(attack_steps=2, ig_steps=3, attack_ig_steps=2, sum_norm=True),
]


@pytest.mark.parametrize("term", PENALTIES, ids=repr)
def test_penalties_leave_batchnorm_statistics_and_parameter_grads_alone(term):
    """(Adversarial training, PGD-AT and TRADES, trains BatchNorm on its adversarial batches on purpose:
    tests/test_adversarial_training.py compares it with the authors' code.)"""
    torch.manual_seed(0)
    net = SmallCNN(width=4, activation=nn.Softplus).double().train()
    x, y = batch(n=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    value = term(net, x, y)
    assert torch.isfinite(value) and value.dim() == 0
    for key, buffer in net.state_dict().items():
        assert torch.equal(buffer, before[key]), key
    assert all(p.grad is None for p in net.parameters())  # input gradients only; the module does one backward
    assert net.training
    value.backward()
    assert all(p.grad is not None for p in net.parameters())
