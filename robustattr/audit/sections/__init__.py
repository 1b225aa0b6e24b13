"""Audit sections: each runs on the audit's fixed, seeded subset, returns JSON-able results, and renders them."""

from robustattr.audit.sections.base import AuditData, RenderContext, Rendered, Section, Table
from robustattr.audit.sections.certified import CertifiedAttributions
from robustattr.audit.sections.explanations import AttributionTransfer, ExplanationFragility, SmoothingWithoutRetraining
from robustattr.audit.sections.geometry import Curvature, ExplainingAway, SemanticDirections
from robustattr.audit.sections.influence import InfluenceAudit
from robustattr.audit.sections.predictions import RobustnessCurves, Transferability
from robustattr.audit.sections.worst_case import WorstCaseFragility

__all__ = [
    "AttributionTransfer",
    "AuditData",
    "CertifiedAttributions",
    "Curvature",
    "ExplainingAway",
    "ExplanationFragility",
    "InfluenceAudit",
    "RenderContext",
    "Rendered",
    "RobustnessCurves",
    "Section",
    "SemanticDirections",
    "SmoothingWithoutRetraining",
    "Table",
    "Transferability",
    "WorstCaseFragility",
]
