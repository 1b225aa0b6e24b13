"""Attribution panels: what an explanation attack does to a few fixed examples, as images."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from robustattr.attacks import ExplanationAttack, TopKAttack
from robustattr.attacks.base import gradient_context, with_seed
from robustattr.attributions import Attribution
from robustattr.callbacks.base import eval_dataset
from robustattr.data.base import seeded_subset
from robustattr.errors import ConfigError
from robustattr.metrics import center_shift, default_k, spearman, topk_intersection, topk_mask
from robustattr.run import run_dir
from robustattr.viz import DPI, PANEL_COLUMNS, image_array, panel_figure


class AttributionPanels(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, attacks the explanation of ``num_examples`` fixed, seeded
    examples and logs, from rank 0 only: a W&B image of the panel grid (clean image, its map, attacked image,
    its map, both top-k masks, per example) under ``val/panels``, and a W&B table with the same images and
    each example's metric values under ``val/panels_table``. With any logger the grid is also saved as
    ``panels/val_epoch<N>.png`` in the run directory."""

    def __init__(
        self,
        attribution: Attribution | None = None,
        attack: ExplanationAttack | None = None,
        num_examples: int = 4,
        every_n_epochs: int = 5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_examples < 1 or every_n_epochs < 1:
            raise ConfigError("AttributionPanels: num_examples and every_n_epochs must be positive")
        self.attack = attack if attack is not None else TopKAttack(steps=20)
        self.attack.attribution = attribution if attribution is not None else self.attack.attribution
        self.attribution = self.attack.attribution
        self.num_examples = num_examples
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.last_png: Path | None = None
        self.last_seconds: float | None = None

    def _examples(self, trainer: pl.Trainer, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded_subset(eval_dataset(trainer, stage), self.num_examples, self.seed)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.log_panels(trainer, pl_module, "val")

    def log_panels(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        start = time.perf_counter()
        x, y = self._examples(trainer, stage)
        with gradient_context(pl_module):
            result = with_seed(self.attack, self.seed).run(pl_module, x.to(pl_module.device), y)
        clean, adv = result.maps_clean.cpu(), result.maps_adv.cpu()
        k = self.attack.k or default_k(*clean.shape[1:])
        masks = (topk_mask(clean, k), topk_mask(adv, k))
        values = {
            "label kept": result.kept.float().cpu(),
            "top-k intersection": topk_intersection(clean, adv, k),
            "spearman": spearman(clean, adv),
            "center shift": center_shift(clean, adv),
        }
        figure = self._figure(x, result.x_adv.cpu(), clean, adv, masks, values, trainer.current_epoch)
        self._save_png(trainer, figure, stage)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, figure, x, result.x_adv.cpu(), clean, adv, masks, values, stage)
        self.last_seconds = time.perf_counter() - start
        rank_zero_info(f"AttributionPanels: {self.last_seconds:.2f} s (epoch {trainer.current_epoch})")

    def _figure(self, x, x_adv, clean, adv, masks, values, epoch):
        title = (
            f"{type(self.attack).__name__} on {type(self.attribution).__name__}, {self.attack.threat.label}, "
            f"epoch {epoch}"
        )
        return panel_figure(x, x_adv, clean, adv, masks, values, title)

    def _save_png(self, trainer, figure, stage) -> None:
        folder = run_dir(trainer) / "panels"
        folder.mkdir(parents=True, exist_ok=True)
        self.last_png = folder / f"{stage}_epoch{trainer.current_epoch:03d}.png"
        figure.savefig(self.last_png, dpi=DPI)

    def _log_wandb(self, logger, figure, x, x_adv, clean, adv, masks, values, stage) -> None:
        import wandb

        logger.log_image(key=f"{stage}/panels", images=[wandb.Image(figure)])
        rows = []
        for i in range(x.shape[0]):
            images = [image_array(x[i]), clean[i].numpy(), image_array(x_adv[i]), adv[i].numpy()]
            images += [masks[0][i].float().numpy(), masks[1][i].float().numpy()]
            rows.append([wandb.Image(img) for img in images] + [float(v[i]) for v in values.values()])
        logger.log_table(key=f"{stage}/panels_table", columns=PANEL_COLUMNS + list(values), data=rows)
