"""Prediction attacks during validation: robust accuracy and attack success rate per attack and epsilon."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from robustattr.attacks import BIM, PGD
from robustattr.attacks.base import with_seed
from robustattr.callbacks.base import AttackCallback
from robustattr.metrics import AttackSuccessRate, RobustAccuracy


class AdversarialValidation(AttackCallback):
    """Runs each attack (BIM by default) at each epsilon on the fixed subset and logs
    ``val/adv/<attack>_<threat><eps>/acc`` (robust accuracy) and ``.../success`` (share of the correctly
    classified samples flipped), plus ``val/adv/clean_acc`` on the same subset. Epsilons are in pixel
    units of [0, 1] images: 0.0313725 is 8/255 and is logged as ``linf8``."""

    short_name = "adv"

    def __init__(
        self,
        attacks: list[PGD] | None = None,
        epsilons: list[float] | None = None,
        num_samples: int = 256,
        batch_size: int = 64,
        every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, batch_size, every_n_epochs, seed)
        attacks = attacks if attacks is not None else [BIM()]
        epsilons = epsilons if epsilons is not None else [attack.threat.eps for attack in attacks[:1]]
        self.settings = {
            f"adv/{attack.short_name}_{attack.threat.with_eps(eps).label}": attack.with_eps(eps)
            for attack in attacks
            for eps in epsilons
        }

    def build_metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"adv/clean_acc": RobustAccuracy()}
        for prefix in self.settings:
            metrics[f"{prefix}/acc"] = RobustAccuracy()
            metrics[f"{prefix}/success"] = AttackSuccessRate()
        return metrics

    def process(self, model, x, y, seed):
        metrics = self.metrics()
        with torch.no_grad():
            logits = model(x)
        metrics["adv/clean_acc"].update(logits, y)
        pred = logits.argmax(dim=1)
        for prefix, attack in self.settings.items():
            x_adv = with_seed(attack, seed)(model, x, y)
            with torch.no_grad():
                logits_adv = model(x_adv)
            metrics[f"{prefix}/acc"].update(logits_adv, y)
            metrics[f"{prefix}/success"].update(pred, logits_adv.argmax(dim=1), y)
