"""Checkpoint audits (the engine behind evaluate.py): sections, safe loading, reports."""

from robustattr.audit.engine import build_data, main, run_audit
from robustattr.audit.loading import AuditedModel, build_net, load_model
from robustattr.audit.sections import (
    AttributionTransfer,
    AuditData,
    CertifiedAttributions,
    Curvature,
    ExplainingAway,
    ExplanationFragility,
    InfluenceAudit,
    RobustnessCurves,
    Section,
    SemanticDirections,
    SmoothingWithoutRetraining,
    Transferability,
    WorstCaseFragility,
)

__all__ = [
    "AttributionTransfer",
    "AuditData",
    "AuditedModel",
    "CertifiedAttributions",
    "Curvature",
    "ExplainingAway",
    "ExplanationFragility",
    "InfluenceAudit",
    "RobustnessCurves",
    "Section",
    "SemanticDirections",
    "SmoothingWithoutRetraining",
    "Transferability",
    "WorstCaseFragility",
    "build_data",
    "build_net",
    "load_model",
    "main",
    "run_audit",
]
