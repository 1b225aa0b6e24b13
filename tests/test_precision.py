"""bf16: every objective term, attack, attribution, callback and audit section, under bf16-mixed (autocast) and
bf16-true (weights and batch in bf16).

No GPU here: CUDA's autocast rules are emulated. CPU autocast also runs matmuls in bf16, but unlike CUDA's it
casts some linear algebra back to fp32 by itself, which hid SSR's bf16 eigh. The guard below fails any linear
algebra that receives a 16-bit matrix or runs with autocast still on, so the code must disable autocast and cast
to fp32 itself, as it must on a GPU. Tests marked ``cuda`` run the headline configs' first steps on a GPU when
one exists."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from robustattr.attacks import BIM, PGD, RandomSignAttack, TopKAttack
from robustattr.attributions import GradientXInput, IntegratedGradients, Saliency, SmoothGrad, UniformGradient
from robustattr.errors import ConfigError
from robustattr.metrics import top_hessian_eigenvalue
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import CURE, SSR, TRADES, AdversarialCE, GradientNorm, HessianNorm, IGNorm
from tests.helpers.zoo import every_attack, every_audit_section

ROOT = Path(__file__).resolve().parents[1]
LINEAR_ALGEBRA = ("eigh", "eigvalsh", "solve", "cholesky", "inv", "svd", "eig")


@pytest.fixture
def cuda_autocast_rules(monkeypatch):
    """Every torch.linalg call must receive fp32/fp64 and run with autocast off."""
    calls = []
    for name in LINEAR_ALGEBRA:
        original = getattr(torch.linalg, name)

        def guarded(a, *args, _original=original, _name=name, **kwargs):
            assert a.dtype in (torch.float32, torch.float64), f"torch.linalg.{_name} got {a.dtype}"
            assert not torch.is_autocast_enabled(a.device.type), f"torch.linalg.{_name} under autocast"
            calls.append(_name)
            return _original(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, guarded)
    return calls


def _net():
    torch.manual_seed(0)
    return SmallCNN(width=8, activation=lambda: nn.Softplus(beta=5)).train()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


TERMS = [
    GradientNorm(),
    CURE(h=0.5),
    SSR(),
    SSR(method="power", power_iters=3, name="ssr_power"),
    HessianNorm(),  # finite differences on this BatchNorm network
    HessianNorm(norm="spectral", power_iters=2, name="spectral"),
    IGNorm(attack_steps=2, ig_steps=3, attack_ig_steps=2),
    AdversarialCE(attack=PGD(steps=2, seed=0)),
    TRADES(steps=2),
]
FINITE_DIFFERENCES = ("cure", "hessian_norm", "spectral")


def _value_and_grads(term, net, x, y):
    torch.manual_seed(3)
    value = term(net, x, y)
    grads = torch.autograd.grad(value, [p for p in net.parameters()], allow_unused=True)
    return value.detach().float(), grads


@pytest.mark.parametrize("term", TERMS, ids=lambda t: t.name)
def test_every_term_under_bf16_autocast_is_finite_and_keeps_linear_algebra_in_fp32(term, cuda_autocast_rules):
    net, (x, y) = _net(), _batch()
    reference, _ = _value_and_grads(term, net, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grads = _value_and_grads(term, net, x, y)
    assert torch.isfinite(value) and all(g is None or torch.isfinite(g).all() for g in grads)
    if term.name in FINITE_DIFFERENCES:  # differences of gradients, taken in fp32: the fp32 value itself
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-6)
    else:  # the network ran in bf16 (3 significant digits)
        torch.testing.assert_close(value, reference, rtol=0.15, atol=1e-3)
    if term.name.startswith("ssr") and term.name != "ssr_power":
        assert "eigh" in cuda_autocast_rules


@pytest.mark.parametrize("term", [t for t in TERMS if t.name not in ("hessian_norm", "spectral")], ids=lambda t: t.name)
def test_every_term_trains_in_bf16_true(term, cuda_autocast_rules):
    """Weights and batch in bf16, as Lightning's bf16-true hands them to the training step."""
    net, (x, y) = _net().to(torch.bfloat16), _batch()
    value, grads = _value_and_grads(term, net, x.to(torch.bfloat16), y)
    assert torch.isfinite(value) and all(g is None or torch.isfinite(g).all() for g in grads)


def test_finite_differences_are_refused_under_bf16_true_with_the_reason():
    module = RobustClassifier(_net(), terms=[HessianNorm()])
    with pytest.raises(ConfigError, match="bf16-true weights cannot resolve"):
        module._check_terms("bf16-true")
    module._check_terms("bf16-mixed")  # taken in fp32 there
    RobustClassifier(SmallCNN(batch_norm=False, activation=nn.Softplus), terms=[HessianNorm()])._check_terms(
        "bf16-true"
    )


ATTACKS = every_attack(8 / 255, l2_eps=0.3, lbfgs_search_steps=1, lbfgs_max_iter=3)


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: type(a).__name__ + repr(getattr(a, "threat", "")))
def test_every_attack_on_a_bf16_network_keeps_its_iterates_in_fp32(attack):
    net = SmallCNN(width=8).eval().to(torch.bfloat16)
    x, y = _batch()
    x_adv = attack(net, x, y)
    assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
    if hasattr(attack, "threat"):  # an 8/255 ball is resolved exactly (bf16 steps near 1 are 1/128)
        assert (attack.threat.norm(x_adv - x) <= attack.threat.eps + 1e-6).all()
    assert attack(net, x.to(torch.bfloat16), y).dtype == torch.bfloat16  # handed back as given


@pytest.mark.parametrize(
    "method",
    [Saliency(), GradientXInput(), IntegratedGradients(steps=4), SmoothGrad(samples=4), UniformGradient(samples=4)],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
def test_every_attribution_of_a_bf16_network_is_an_fp32_map(method):
    net = SmallCNN(width=8).eval()
    x, y = _batch()
    reference = method(net, x, y)
    attribution = method(net.to(torch.bfloat16), x, y)
    assert attribution.dtype == torch.float32 and torch.isfinite(attribution).all()
    cosine = torch.nn.functional.cosine_similarity(attribution.flatten(1), reference.flatten(1), dim=1)
    assert (cosine > 0.9).all()


def test_curvature_measurements_on_a_bf16_network(cuda_autocast_rules):
    net = _net().eval()
    x, y = _batch()
    norms, eigs = top_hessian_eigenvalue(
        net.to(torch.bfloat16), x, y, iters=3, generator=torch.Generator().manual_seed(0)
    )
    assert norms.dtype == eigs.dtype == torch.float32 and torch.isfinite(eigs).all()


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_callbacks_validate_in_bf16(tmp_path, precision):
    from robustattr.callbacks import AdversarialValidation, AttributionPanels, CurvatureMonitor, FragilityValidation
    from robustattr.data import DigitsDataModule

    pl.seed_everything(0)
    callbacks = [
        AdversarialValidation(attacks=[BIM(steps=2)], num_samples=8),
        FragilityValidation(attacks=[TopKAttack(steps=2), RandomSignAttack()], num_samples=8),
        CurvatureMonitor(num_samples=8, power_iters=2),
        AttributionPanels(attack=TopKAttack(steps=2), num_examples=2),
    ]
    trainer = pl.Trainer(precision=precision, logger=False, enable_progress_bar=False, callbacks=callbacks,
                         default_root_dir=tmp_path)  # fmt: skip
    (results,) = trainer.validate(RobustClassifier(SmallCNN(width=8)), datamodule=DigitsDataModule(), verbose=False)
    for name in ("val/adv/bim_linf8/acc", "val/frag/saliency/topk_linf8/spearman", "val/curv/hessian_top_eig"):
        assert torch.isfinite(torch.tensor(results[name])), name


@pytest.mark.slow
def test_every_audit_section_runs_on_a_bf16_network(tmp_path):
    from robustattr.audit import run_audit

    torch.save(SmallCNN(width=8).state_dict(), tmp_path / "net.pt")
    sections = every_audit_section(num_samples=8, epsilons=[8 / 255])
    report = run_audit(
        [str(tmp_path / "net.pt"), str(tmp_path / "net.pt")], sections, out=str(tmp_path / "audit"), num_samples=8,
        batch_size=4, net={"class_path": "robustattr.models.SmallCNN", "init_args": {"width": 8}},
        data={"class_path": "robustattr.data.DigitsDataModule"}, dtype="bfloat16", html=True,
    )  # fmt: skip
    assert set(report["results"]) == {s.name for s in sections}
    robustness = next(iter(report["results"]["robustness"].values()))
    assert 0 <= robustness["clean_accuracy"] <= 1 and report["data"]["num_samples"] == 8


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="no GPU on this machine")
@pytest.mark.parametrize("config", ["cifar_reg", "cifar_gradnorm", "cifar_cure", "cifar_pgd_at", "cifar_trades"])
def test_headline_configs_take_their_first_steps_on_a_gpu(tmp_path, config):
    """bf16-mixed under CUDA's real autocast rules, on the digits as CIFAR-shaped inputs."""
    digits = json.dumps({"class_path": "robustattr.data.DigitsDataModule",
                         "init_args": {"image_size": 32, "channels": 3, "batch_size": 16}})  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{config}.yaml"),
         "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.fast_dev_run", "2",
         "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--data", digits],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
