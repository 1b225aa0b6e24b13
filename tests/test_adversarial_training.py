"""PGD-AT and TRADES against direct transcriptions of the authors' training steps: the same loss, the same
parameter gradients, the same BatchNorm running statistics, and no more forward passes than theirs."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustattr.attacks import PGD, LinfBall
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import TRADES, AdversarialCE

EPS, STEPS, ALPHA = 0.1, 4, 0.03


def _setup():
    torch.manual_seed(0)
    net = SmallCNN(width=4).double().train()
    with torch.no_grad():  # non-trivial running statistics to start from
        net(torch.rand(16, 1, 8, 8, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    return net, torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(6) % 10


class Forwards:
    """Counts forward passes of a network."""

    def __init__(self, net: nn.Module):
        self.count = 0
        net.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        self.count += 1


def _ours(net, x, y, **module_kwargs):
    module = RobustClassifier(net, **module_kwargs)
    counter = Forwards(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step((x, y), 0)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, counter.count


def _stats(net):
    return {k: v for k, v in net.state_dict().items() if "running" in k}


def test_pgd_at_equals_madrys_step_and_skips_the_clean_pass():
    net, x, y = _setup()
    reference = copy.deepcopy(net)
    counter = Forwards(reference)
    # Madry et al.: PGD from a uniform random start, crafted with the network in eval mode, then one training step
    # on the adversarial batch alone, the network in training mode (its BatchNorm learns from that batch).
    reference.eval()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    x_adv = (x + (2 * noise - 1) * EPS).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(reference(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + ALPHA * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    reference.train()
    expected = F.cross_entropy(reference(x_adv), y)
    expected.backward()

    attack = PGD(LinfBall(EPS), steps=STEPS, step_size=ALPHA, seed=0)
    loss, grads, forwards = _ours(net, x, y, terms=[AdversarialCE(attack=attack)], ce_weight=0.0)
    torch.testing.assert_close(loss, expected.detach())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    for key, value in _stats(reference).items():
        torch.testing.assert_close(_stats(net)[key], value, msg=key)  # statistics of the adversarial batch
    assert forwards == counter.count == STEPS + 1  # no clean forward: nothing would use it


def test_trades_equals_the_authors_step():
    net, x, y = _setup()
    reference = copy.deepcopy(net)
    counter = Forwards(reference)
    beta = 6.0
    # The TRADES authors' trades_loss, transcribed (its criterion_kl sums; the robust loss divides by the batch).
    torch.manual_seed(5)
    reference.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        loss_kl = F.kl_div(F.log_softmax(reference(x_adv), dim=1), F.softmax(reference(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss_kl, [x_adv])
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    reference.train()
    logits = reference(x)
    loss_natural = F.cross_entropy(logits, y)
    # The authors call model(x_natural) a second time here; in training mode it returns the same outputs, so the
    # first call's logits stand in for it (the only difference: their running statistics see the clean batch twice).
    loss_robust = (1.0 / len(x)) * F.kl_div(
        F.log_softmax(reference(x_adv), dim=1), F.softmax(logits, dim=1), reduction="sum"
    )
    expected = loss_natural + beta * loss_robust
    expected.backward()

    torch.manual_seed(5)
    term = TRADES(weight=beta, threat=LinfBall(EPS), steps=STEPS, step_size=ALPHA)
    loss, grads, forwards = _ours(net, x, y, terms=[term])
    torch.testing.assert_close(loss, expected.detach())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    for key, value in _stats(reference).items():
        torch.testing.assert_close(_stats(net)[key], value, msg=key)
    # theirs: two forwards per attack step (x' and the unchanging clean target) and three for the loss
    assert counter.count == 2 * STEPS + 3 - 1 and forwards == STEPS + 3  # ours: the clean target once


def test_adversarial_training_reports_its_robust_training_accuracy(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from robustattr.data import DigitsDataModule

    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=4), terms=[AdversarialCE(attack=PGD(steps=2))], ce_weight=0.0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule())
    assert 0 <= trainer.callback_metrics["train/pgd_at/acc"] <= 1
    assert "train/acc" not in trainer.callback_metrics  # no clean forward, no clean accuracy


def test_nothing_to_train_is_refused():
    from robustattr.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing would be trained"):
        RobustClassifier(SmallCNN(), ce_weight=0.0)
