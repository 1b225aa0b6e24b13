"""Validation-time callbacks (installed as ``robustattr.callbacks``): attacks and attributions run on a fixed,
seeded subset during validation and are logged as ``val/adv/...``, ``val/frag/...`` and ``val/curv/...``,
with image panels to W&B."""

from robustattr.callbacks.adversarial import AdversarialValidation
from robustattr.callbacks.base import AttackCallback
from robustattr.callbacks.checkpoint import LastCheckpoint
from robustattr.callbacks.curvature import CurvatureMonitor
from robustattr.callbacks.fragility import FragilityValidation
from robustattr.callbacks.influence import SelfInfluenceMonitor
from robustattr.callbacks.panels import AttributionPanels

__all__ = [
    "AdversarialValidation",
    "AttackCallback",
    "AttributionPanels",
    "CurvatureMonitor",
    "FragilityValidation",
    "LastCheckpoint",
    "SelfInfluenceMonitor",
]
