"""Prediction attacks during validation: robust accuracy and attack success rate per attack and epsilon."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection

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
        **schedule: Any,
    ) -> None:
        super().__init__(num_samples, **schedule)  # batch_size, every_n_epochs, seed: see AttackCallback
        attacks = attacks if attacks is not None else [BIM()]
        epsilons = epsilons if epsilons is not None else [attack.threat.eps for attack in attacks[:1]]
        self.settings = {
            f"adv/{attack.short_name}_{attack.threat.with_eps(eps).label}": attack.with_eps(eps)
            for attack in attacks
            for eps in epsilons
        }

    def build_metrics(self) -> dict[str, MetricCollection]:
        collections = {"adv/clean": MetricCollection({"clean_acc": RobustAccuracy()}, prefix="adv/")}
        for prefix in self.settings:
            # different inputs, different states: no compute group (torchmetrics would merge metrics whose
            # states happen to be equal after the first batch)
            acc_and_success = {"acc": RobustAccuracy(), "success": AttackSuccessRate()}
            collections[prefix] = MetricCollection(acc_and_success, prefix=f"{prefix}/", compute_groups=False)
        return collections

    def process(self, model, x, y, seed):
        collections = self.metrics()
        with torch.no_grad():
            logits = model(x)
        collections["adv/clean"].update(logits, y)
        pred = logits.argmax(dim=1)
        for prefix, attack in self.settings.items():
            x_adv = with_seed(attack, seed)(model, x, y)
            with torch.no_grad():
                logits_adv = model(x_adv)
            collections[prefix].update(logits_adv=logits_adv, y=y, pred_clean=pred, pred_adv=logits_adv.argmax(dim=1))
