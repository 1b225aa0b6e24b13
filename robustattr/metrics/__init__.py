"""Attribution-robustness and attack metrics: pure functions (`functional`) and torchmetrics classes."""

from robustattr.metrics import functional
from robustattr.metrics.classes import (
    MAP_METRICS,
    AttackSuccessRate,
    CenterShift,
    CosineDistance,
    KendallTau,
    LabelKeptRate,
    PerSampleMean,
    RobustAccuracy,
    SpearmanCorrelation,
    TopKIntersection,
    map_metrics,
)
from robustattr.metrics.diagnostics import top_hessian_eigenvalue
from robustattr.metrics.functional import (
    attack_success,
    center_of_mass,
    center_shift,
    cosine_distance,
    default_k,
    kendall_tau,
    label_kept,
    pixel_map,
    robust_accuracy,
    spearman,
    topk_intersection,
    topk_mask,
)

__all__ = [
    "MAP_METRICS",
    "AttackSuccessRate",
    "CenterShift",
    "CosineDistance",
    "KendallTau",
    "LabelKeptRate",
    "PerSampleMean",
    "RobustAccuracy",
    "SpearmanCorrelation",
    "TopKIntersection",
    "attack_success",
    "center_of_mass",
    "center_shift",
    "cosine_distance",
    "default_k",
    "functional",
    "kendall_tau",
    "label_kept",
    "map_metrics",
    "pixel_map",
    "robust_accuracy",
    "spearman",
    "top_hessian_eigenvalue",
    "topk_intersection",
    "topk_mask",
]
