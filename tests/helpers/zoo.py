"""One of each attack and of each attribution method, tiny, for the tests that run every one of them."""

from robustattr import attacks as A
from robustattr import attributions as M


def every_attack(eps: float, l2_eps: float, lbfgs_search_steps: int, lbfgs_max_iter: int) -> list:
    """Every prediction and explanation attack at two steps (L-BFGS with the given budget), PGD in both balls;
    the attacks that draw random numbers are seeded."""
    return [
        A.FGSM(A.LinfBall(eps)),
        A.BIM(A.LinfBall(eps), steps=2),
        A.PGD(A.LinfBall(eps), steps=2, seed=0),
        A.PGD(A.L2Ball(l2_eps), steps=2, seed=0),
        A.LBFGS(search_steps=lbfgs_search_steps, max_iter=lbfgs_max_iter, seed=0),
        A.TopKAttack(threat=A.LinfBall(eps), steps=2),
        A.MassCenterAttack(threat=A.LinfBall(eps), steps=2, seed=0),
        A.TargetedAttack(threat=A.LinfBall(eps), steps=2),
        A.TargetMapAttack(threat=A.LinfBall(eps), steps=2),
        A.RandomSignAttack(threat=A.LinfBall(eps), seed=0),
    ]


def every_attribution(samples: int = 4) -> list:
    """Every attribution method, the noise-averaging and path methods with ``samples`` evaluations."""
    return [
        M.Saliency(),
        M.GradientXInput(),
        M.IntegratedGradients(steps=samples),
        M.SmoothGrad(samples=samples),
        M.UniformGradient(samples=samples),
        M.DeepLift(),
        M.GradientShap(samples=samples),
        M.Occlusion(window=2, stride=2),
    ]
