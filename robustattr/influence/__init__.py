"""Influence of training points on predictions (Koh & Liang 2017; TracIn): one interface over four backends.

Positive scores are helpful (removing the training point would raise the query's loss), scaled as Koh & Liang's
``-(1/n) I_up,loss``; see `robustattr.influence.base`. Backends, by scope size:

- `ExactInfluence`: the dense damped Hessian or Gauss-Newton matrix (small scopes; the reference);
- `CGInfluence`: conjugate gradients on curvlinops' curvature operators (medium scopes);
- `EKFACInfluence`: kronfluence's EK-FAC (any scope of Linear/Conv2d layers; fastest for self-influence);
- `TracIn`: gradient dot products over the checkpoints a run saved.
"""

from robustattr.influence.base import Influence, InfluenceScores, TopK
from robustattr.influence.data import TrainingSet
from robustattr.influence.ekfac import EKFACInfluence
from robustattr.influence.exact import ExactInfluence, SingularCurvatureError
from robustattr.influence.iterative import CGInfluence
from robustattr.influence.scope import Scope, resolve_scope
from robustattr.influence.tracin import TracIn, checkpoint_learning_rate

__all__ = [
    "CGInfluence",
    "EKFACInfluence",
    "ExactInfluence",
    "Influence",
    "InfluenceScores",
    "Scope",
    "SingularCurvatureError",
    "TopK",
    "TracIn",
    "TrainingSet",
    "checkpoint_learning_rate",
    "resolve_scope",
]
