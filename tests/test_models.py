import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustattr.errors import ConfigError, RobustAttrError
from robustattr.models import (
    PIECEWISE_LINEAR,
    Normalize,
    PreActResNet18,
    ResNet18,
    SmallCNN,
    TimmNet,
    TorchvisionNet,
    WideResNet,
    count_activations,
    swap_activations,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_normalize_known_answer_and_broadcast():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(norm(x)[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    single = Normalize((0.5,), (0.25,))
    torch.testing.assert_close(single(torch.zeros(2, 3, 1, 1)), torch.full((2, 3, 1, 1), -2.0))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize((0.0,), (0.0,))


@pytest.mark.parametrize(
    "net, shape",
    [
        (SmallCNN(), (2, 1, 8, 8)),
        (SmallCNN(in_channels=3), (2, 3, 32, 32)),
        (ResNet18(num_classes=7), (2, 3, 32, 32)),
        (PreActResNet18(num_classes=7), (2, 3, 32, 32)),
        (WideResNet(num_classes=7, depth=16, widen_factor=2), (2, 3, 32, 32)),
        (TimmNet("resnet18", num_classes=7), (2, 3, 32, 32)),
        (TorchvisionNet("resnet18", num_classes=7), (2, 3, 32, 32)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_forward_shapes_and_num_classes(net, shape):
    net.eval()
    out = net(torch.rand(shape))
    assert out.shape == (shape[0], net.num_classes)
    assert torch.isfinite(out).all()


def test_parameter_counts_match_the_published_architectures():
    assert n_params(ResNet18()) == pytest.approx(11.17e6, rel=0.01)
    assert n_params(PreActResNet18()) == pytest.approx(11.17e6, rel=0.01)
    assert n_params(WideResNet()) == pytest.approx(36.48e6, rel=0.01)  # WRN-28-10
    with pytest.raises(ConfigError, match="6n\\+4"):
        WideResNet(depth=27)


def _small_nets():
    return [
        SmallCNN(),
        ResNet18(width=8),
        PreActResNet18(width=8),
        WideResNet(depth=10, widen_factor=1),
        TimmNet("resnet18", num_classes=10),
        TorchvisionNet("resnet18", num_classes=10),
        TimmNet("mobilenetv3_small_050", num_classes=10),  # Hardswish / timm activation layers
    ]


@pytest.mark.parametrize(
    "net", _small_nets(), ids=lambda m: type(m).__name__ + getattr(m, "model", m).__class__.__name__
)
def test_swap_activations_leaves_no_piecewise_linear_module(net):
    before = count_activations(net)
    assert before > 0
    replaced = swap_activations(net, lambda: nn.Softplus(beta=10))
    assert count_activations(net) == 0
    assert sum(isinstance(m, nn.Softplus) for m in net.modules()) == replaced
    assert replaced <= before  # shared modules (torchvision's self.relu) are replaced once


def _affine_defect(net, shape):
    net = net.double().eval()
    x1, x2 = torch.rand(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    a = 0.3
    with torch.no_grad():
        mixed = net(a * x1 + (1 - a) * x2)
        combo = a * net(x1) + (1 - a) * net(x2)
    return (mixed - combo).abs().max().item()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: SmallCNN(), (3, 1, 8, 8)),
        (lambda: ResNet18(width=8), (3, 3, 16, 16)),
        (lambda: PreActResNet18(width=8), (3, 3, 16, 16)),
        (lambda: WideResNet(depth=10, widen_factor=1), (3, 3, 16, 16)),
    ],
)
def test_swap_is_complete_functionally(make, shape):
    """With every activation replaced by the identity, an eval-mode network is affine in its input: a ReLU
    left anywhere (module or functional) would break that."""
    torch.manual_seed(0)
    relu_net = make()
    assert _affine_defect(relu_net, shape) > 1e-3  # the test can fail: ReLU networks are not affine
    swap_activations(relu_net, nn.Identity)
    assert _affine_defect(relu_net, shape) < 1e-9


def _hvp_norm(net, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(x)[:, 0].sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.ones_like(x)).sum(), x, allow_unused=True)
    return 0.0 if hv is None else hv.abs().sum().item()


def test_activation_option_softplus_gives_curvature_relu_gives_none():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    relu = SmallCNN(batch_norm=False).double().eval()
    smooth = SmallCNN(batch_norm=False, activation=lambda: nn.Softplus(beta=5)).double().eval()
    assert _hvp_norm(relu, x) == 0.0  # ReLU: the input Hessian is exactly zero
    assert _hvp_norm(smooth, x) > 1e-6
    gelu = SmallCNN(activation=nn.GELU)
    assert count_activations(gelu) == 0 and sum(isinstance(m, nn.GELU) for m in gelu.modules()) == 4


def test_piecewise_linear_covers_relu_inplace_and_relu6():
    seq = nn.Sequential(nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(), nn.Hardswish(), nn.Tanh())
    assert count_activations(seq) == 4
    assert swap_activations(seq, nn.GELU) == 4
    assert isinstance(seq[4], nn.Tanh) and not isinstance(seq[0], PIECEWISE_LINEAR)


def test_timm_fused_attention_is_off_by_default():
    vit = TimmNet("vit_tiny_patch16_224", num_classes=10, model_kwargs={"img_size": 32, "patch_size": 8})
    flags = [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)
    assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("fmt", ["pt_ddp_prefix", "lightning_like", "safetensors"])
def test_weights_load_from_a_local_file_only(tmp_path, fmt):
    source = TimmNet("resnet18", num_classes=10).eval()
    state = source.model.state_dict()
    if fmt == "pt_ddp_prefix":
        path = tmp_path / "w.pth"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "lightning_like":
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": {f"net.model.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = TimmNet("resnet18", num_classes=10, weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x))


def test_weights_with_another_head_need_strict_off(tmp_path):
    path = tmp_path / "imagenet_head.pth"
    torch.save(TorchvisionNet("resnet18", num_classes=1000).model.state_dict(), path)
    with pytest.raises(RobustAttrError, match="shapes do not match"):
        TorchvisionNet("resnet18", num_classes=10, weights=str(path))
    net = TorchvisionNet("resnet18", num_classes=10, weights=str(path), strict_weights=False)
    torch.testing.assert_close(net.model.conv1.weight, torch.load(path)["conv1.weight"])
