"""Attacks on predictions (``attack(model, x, y) -> x_adv``) and on explanations, with their threat models.

Every attack works under ``torch.no_grad`` and ``torch.inference_mode``, leaves the model's train/eval modes,
parameter gradients and BatchNorm statistics untouched, is batched, seeded, and runs on the model's device.
"""

from robustattr.attacks.base import IterativeAttack, choose_target, gradient_context
from robustattr.attacks.explanation import (
    APGDStep,
    AttackDiagnostics,
    AttackState,
    CleanExplanation,
    ExplanationAttack,
    ExplanationAttackResult,
    FixedStep,
    Iterate,
    Judge,
    MassCenterAttack,
    RandomSignAttack,
    Search,
    TargetedAttack,
    TargetMapAttack,
    TopKAttack,
)
from robustattr.attacks.gradient import BIM, FGSM, PGD, projected_ascent
from robustattr.attacks.lbfgs import LBFGS, LBFGSResult, rms_distortion
from robustattr.attacks.surrogate import (
    BetaSchedule,
    SecondOrderZeroError,
    require_second_order,
    shared_weight_copy,
    softplus_surrogate,
)
from robustattr.attacks.threat import L2Ball, LinfBall, ThreatModel
from robustattr.attacks.worst_case import (
    Check,
    WorstCaseExplanationAttack,
    WorstCaseResult,
    default_members,
    raised,
    sanity_checks,
)

__all__ = [
    "BIM",
    "FGSM",
    "LBFGS",
    "PGD",
    "APGDStep",
    "AttackDiagnostics",
    "AttackState",
    "BetaSchedule",
    "Check",
    "CleanExplanation",
    "ExplanationAttack",
    "ExplanationAttackResult",
    "FixedStep",
    "Iterate",
    "IterativeAttack",
    "Judge",
    "L2Ball",
    "LBFGSResult",
    "LinfBall",
    "MassCenterAttack",
    "RandomSignAttack",
    "Search",
    "SecondOrderZeroError",
    "TargetMapAttack",
    "TargetedAttack",
    "ThreatModel",
    "TopKAttack",
    "WorstCaseExplanationAttack",
    "WorstCaseResult",
    "choose_target",
    "default_members",
    "gradient_context",
    "projected_ascent",
    "raised",
    "require_second_order",
    "rms_distortion",
    "sanity_checks",
    "shared_weight_copy",
    "softplus_surrogate",
]
