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


def every_audit_section(num_samples: int, epsilons: list[float]) -> list:
    """Every audit section but the influence one (which reads a training split), at the smallest settings that
    still draw every figure; the explanation sections on half of ``num_samples``."""
    from robustattr.audit import sections as S

    methods = [M.Saliency(), M.IntegratedGradients(steps=2)]
    half = num_samples // 2
    return [
        S.RobustnessCurves(epsilons=epsilons, steps=2, lbfgs_samples=4, lbfgs_search_steps=1, lbfgs_max_iter=3),
        S.ExplanationFragility(methods=methods, epsilons=epsilons, steps=1, num_samples=half, examples=2),
        S.AttributionTransfer(methods=methods, num_samples=half),
        S.SmoothingWithoutRetraining(num_samples=half, samples=2, betas=[3.0]),
        S.Curvature(power_iters=2, num_samples=num_samples),
        S.ExplainingAway(steps=2, ig_steps=2, num_samples=num_samples),
        S.Transferability(steps=2, num_samples=num_samples),
        S.SemanticDirections(top=4),
        S.WorstCaseFragility(
            methods=[M.Saliency(), M.SmoothGrad(samples=2)],
            epsilons=epsilons,
            steps=2,
            restarts=1,
            betas=[30.0],
            budgets={},
            num_samples=max(half, 2),
        ),
        S.CertifiedAttributions(
            sigma=0.25,
            n=32,
            radii=[0.0, 0.1, 0.25],
            attack_radii=[0.25],
            steps=2,
            surrogate_samples=2,
            eval_draws=8,
            num_samples=max(half, 2),
        ),
    ]
