"""Regularisers inside RobustClassifier training: effects on the digits, and the safety rules."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from robustattr.attacks import PGD, LinfBall
from robustattr.data import DigitsDataModule
from robustattr.errors import ConfigError
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import CURE, SSR, TRADES, AdversarialCE, GradientNorm, HessianNorm, IGNorm, ObjectiveTerm


def _trainer(**kwargs):
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


def _smooth_cnn():
    return SmallCNN(width=16, activation=lambda: nn.Softplus(beta=5.0))


def _fit(terms, epochs=4):
    pl.seed_everything(0)
    module = RobustClassifier(_smooth_cnn(), terms=terms, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    _trainer(max_epochs=epochs).fit(module, datamodule=DigitsDataModule())
    return module.net.eval()


@pytest.fixture(scope="module")
def test_batch():
    dm = DigitsDataModule()
    return next(iter(dm.test_dataloader()))


@pytest.fixture(scope="module")
def plain():
    return _fit([])


def _accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


EFFECTS = [
    # (term trained with, how its quantity is measured on held-out digits, measured plain -> regularised)
    (GradientNorm(weight=1.0), GradientNorm()),  # 0.59 -> 0.31
    (CURE(weight=4.0, h=1.5), CURE(h=1.5)),  # 47 -> 0.09
    (SSR(weight=1.0), SSR()),  # 4.1 -> 0.53
    (HessianNorm(weight=0.1), HessianNorm(probes=8, seed=0)),
    (IGNorm(attack_steps=2, ig_steps=4, attack_ig_steps=2), IGNorm(attack_steps=3, ig_steps=8, attack_ig_steps=4)),
    (TRADES(steps=3), TRADES(steps=5)),  # 0.066 -> 0.025
]


@pytest.mark.slow
@pytest.mark.parametrize("train_term, measure", EFFECTS, ids=lambda t: getattr(t, "name", ""))
def test_each_term_lowers_what_it_penalises(plain, test_batch, train_term, measure):
    x, y = test_batch
    regularised = _fit([train_term])
    torch.manual_seed(0)
    before = measure(plain, x, y).item()
    torch.manual_seed(0)
    after = measure(regularised, x, y).item()
    assert after < 0.7 * before, (before, after)
    assert _accuracy(regularised, x, y) > 0.8


@pytest.mark.slow
def test_pgd_adversarial_training_raises_robust_accuracy(plain, test_batch):
    x, y = test_batch
    trained = _fit([AdversarialCE(attack=PGD(LinfBall(0.1), steps=3, seed=None))])
    attack = PGD(LinfBall(0.1), steps=10)
    robust = {name: _accuracy(net, attack(net, x, y), y) for name, net in (("plain", plain), ("pgd_at", trained))}
    assert robust["pgd_at"] > robust["plain"] + 0.3  # measured: 0.34 -> 0.91


class ExplodesAt(ObjectiveTerm):
    def __init__(self, call: int):
        super().__init__(name="exploding")
        self.call, self.calls = call, 0

    def forward(self, model, x, y):
        self.calls += 1
        value = model(x).mean() * 0
        return value + float("nan") if self.calls == self.call else value


def test_a_nan_penalty_stops_training_naming_the_term_and_the_step():
    module = RobustClassifier(SmallCNN(width=8), terms=[ExplodesAt(call=3)])
    with pytest.raises(FloatingPointError, match=r"step 2 .*the penalty exploding is not finite"):
        _trainer(max_epochs=1).fit(module, datamodule=DigitsDataModule())


def test_a_nan_penalty_can_skip_the_step_with_a_warning():
    module = RobustClassifier(SmallCNN(width=8), terms=[ExplodesAt(call=1)], nonfinite="skip")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.warns(UserWarning, match="the penalty exploding is not finite .*; update skipped"):
        _trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=DigitsDataModule())
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))  # no update
    module.terms[0].call = 0  # never again: training goes on
    _trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=DigitsDataModule())
    assert not all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def test_fp16_with_second_order_terms_is_refused_bf16_and_fp32_work():
    module = RobustClassifier(SmallCNN(width=8), terms=[GradientNorm(), TRADES(steps=1)])
    with pytest.raises(ConfigError, match=r"fp16.*gradient_norm"):
        module._check_terms("16-mixed")
    module._check_terms("bf16-mixed")
    module._check_terms("32-true")
    RobustClassifier(SmallCNN(width=8), terms=[TRADES(steps=1)])._check_terms("16-mixed")  # first order: fine
    trainer = _trainer(max_steps=2, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert torch.isfinite(trainer.callback_metrics["train/reg/gradient_norm"])


def test_curvature_terms_on_relu_networks_warn_what_they_measure():
    module = RobustClassifier(SmallCNN(width=8), terms=[SSR()])
    with pytest.warns(UserWarning, match="ssr on a piecewise-linear.*Gauss-Newton"):
        _trainer(fast_dev_run=1).fit(module, datamodule=DigitsDataModule())


def test_one_backward_reaches_every_parameter_and_training_updates_no_running_stats_twice():
    """The DDP-safe pattern: terms take input gradients only, and the step ends in one backward of CE plus
    penalties that reaches every parameter; BatchNorm statistics move once per step (the clean forward)."""
    torch.manual_seed(0)
    module = RobustClassifier(SmallCNN(width=8), terms=[GradientNorm(), CURE(), SSR()])
    module.train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    bn = module.net.features[1]
    loss = module.training_step((x, y), 0)
    assert all(p.grad is None for p in module.parameters())
    assert bn.num_batches_tracked.item() == 1
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_warmup_ramps_the_weight_or_cures_step():
    term = GradientNorm(weight=2.0, warmup_epochs=2.0)
    term.epoch = 0.5
    assert term.current_weight == 0.5
    term.epoch = 3.0
    assert term.current_weight == 2.0
    cure = CURE(weight=4.0, warmup_epochs=2.0)
    cure.epoch = 1.0
    assert cure.current_weight == 4.0 and cure.ramp == 0.5
