"""Attributions with one call, ``attribution(model, x, target, create_graph=False) -> tensor like x``."""

from robustattr.attributions.captum_adapters import CaptumAttribution, DeepLift, GradientShap, Occlusion
from robustattr.attributions.gradient import (
    Attribution,
    GradientXInput,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    UniformGradient,
)

__all__ = [
    "Attribution",
    "CaptumAttribution",
    "DeepLift",
    "GradientShap",
    "GradientXInput",
    "IntegratedGradients",
    "Occlusion",
    "Saliency",
    "SmoothGrad",
    "UniformGradient",
]
