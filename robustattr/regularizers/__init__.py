"""Objective terms added to the cross-entropy training loss (``RobustClassifier(terms=[...])``)."""

from robustattr.derivatives import frozen_norm_stats, logit_jvp, logit_vjp, loss_hvp, per_sample_norm
from robustattr.regularizers.adversarial import TRADES, AdversarialCE, IGNorm, integrated_loss_gradients
from robustattr.regularizers.base import ObjectiveTerm
from robustattr.regularizers.smoothness import CURE, SSR, GradientNorm, HessianNorm

__all__ = [
    "CURE",
    "SSR",
    "TRADES",
    "AdversarialCE",
    "GradientNorm",
    "HessianNorm",
    "IGNorm",
    "ObjectiveTerm",
    "frozen_norm_stats",
    "integrated_loss_gradients",
    "logit_jvp",
    "logit_vjp",
    "loss_hvp",
    "per_sample_norm",
]
