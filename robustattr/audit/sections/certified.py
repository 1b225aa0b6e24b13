"""Certified attribution robustness beside the strongest L2 attack: a lower bound and an upper bound on the same
quantity, the top k of the sparsified smoothed map (`robustattr.certify`), in one figure."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from robustattr.attacks import L2Ball, WorstCaseExplanationAttack
from robustattr.attacks.base import with_seed
from robustattr.attributions import Attribution, Saliency
from robustattr.audit.sections.base import Rendered, Section, Table, method_panels, stacked, sweep
from robustattr.audit.sections.uncertainty import comparison_table, comparisons_of, describe, error_bars, values_list
from robustattr.certify import CertifiedMap, NoiseSmoothed, certify
from robustattr.errors import ConfigError
from robustattr.metrics import functional as M
from robustattr.metrics.intervals import Estimate, mean_interval, proportion_interval

CERTIFIED = ("certified_topk_fraction", "certified_pixel_fraction", "certified_top_fraction")


def _radius_label(radius: float) -> str:
    return f"{radius:.3g}"


class CertifiedAttributions(Section):
    """Per method: Levine et al.'s certified top-k fraction and Anani et al.'s certified-pixel fractions against the
    L2 radius (each a mean over the audited samples with its bootstrap 95% interval), and at ``attack_radii`` the
    empirical top-k intersection of the same sparsified smoothed map after the worst-case ensemble under an L2 ball
    (`WorstCaseExplanationAttack` ascending the differentiable `NoiseSmoothed` surrogate with fresh noise each step,
    the map re-estimated with ``eval_draws`` draws). The certificate is a lower bound (it holds for every perturbation,
    at the stated confidence), the attack an upper bound; the truth lies between. The noise floor is the same
    intersection between two independent estimates at the clean input.

    Args:
        methods: attributions certified (default saliency, whose smoothed form is SmoothGrad).
        sigma: the smoothing noise (pixel units of [0, 1] images).
        n: draws per sample for the certificates; n0: Anani's mode-selection draws (default `default_n0`).
        alpha: 1 - confidence.
        radii: the L2 radii of the certified curves (free: computed from the certificates' per-sample radii).
        attack_radii: the L2 radii attacked (each must be in ``radii``).
        steps, restarts, betas: the L2 ensemble's budget; surrogate_samples: noisy copies per attack step.
        eval_draws: draws re-estimating the sparsified smoothed map at the attacked point.
        num_samples: audited samples (the first of the audit's subset); batch_size: noisy images per pass.
    """

    name = "certified_attributions"
    title = "certified attribution robustness (L2 certificates beside the L2 worst case)"

    def __init__(
        self,
        methods: list[Attribution] | None = None,
        sigma: float = 0.25,
        n: int = 4096,
        n0: int | None = None,
        alpha: float = 0.05,
        radii: list[float] | None = None,
        attack_radii: list[float] | None = None,
        steps: int = 10,
        restarts: int = 1,
        betas: list[float] | None = None,
        surrogate_samples: int = 8,
        eval_draws: int = 1024,
        num_samples: int = 64,
        batch_size: int = 1024,
    ) -> None:
        self.methods = methods if methods is not None else [Saliency()]
        names = [m.short_name for m in self.methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"CertifiedAttributions: methods {names} repeat a method")
        self.radii = [float(r) for r in (radii if radii is not None else np.round(np.linspace(0, 0.5, 11), 4))]
        self.attack_radii = [float(r) for r in (attack_radii if attack_radii is not None else [0.1, 0.25])]
        for r in self.attack_radii:
            L2Ball(r)  # an impossible radius is refused here, with its reason
            if r not in self.radii:
                raise ConfigError(f"CertifiedAttributions: attack radius {r} is not one of the radii {self.radii}")
        if num_samples < 2:
            raise ConfigError(f"CertifiedAttributions: num_samples must be at least 2 (an interval), got {num_samples}")
        if eval_draws < 2:
            raise ConfigError(f"CertifiedAttributions: eval_draws must be at least 2, got {eval_draws}")
        self.sigma, self.n, self.n0, self.alpha = float(sigma), int(n), n0, float(alpha)
        self.eval_draws, self.num_samples, self.batch_size = int(eval_draws), int(num_samples), int(batch_size)
        self.attacks = {
            m.short_name: WorstCaseExplanationAttack(
                NoiseSmoothed(m, self.sigma, surrogate_samples),
                L2Ball(max(self.attack_radii)),
                steps=steps,
                restarts=restarts,
                betas=betas if betas is not None else [30.0],
            )
            for m in self.methods
        }

    def work(self, data):
        return len(self.methods) * 2 * data.count(self.num_samples)

    def _certify(self, model, method, x, seed, index, draws=None, target=None) -> CertifiedMap:
        return certify(
            model, x, method, self.sigma, draws or self.n, target=target, n0=self.n0 if draws is None else None,
            alpha=self.alpha, batch_size=self.batch_size, seed=seed, index=index,
        )  # fmt: skip

    def run(self, model, data, progress):
        out: dict[str, Any] = {
            "sigma": self.sigma,
            "n": self.n,
            "alpha": self.alpha,
            "radii": self.radii,
            "attack_radii": self.attack_radii,
            "certified": {},
            "cost": {},
        }
        copies = len(self.attack_radii)
        for method in self.methods:
            name = method.short_name
            started = time.perf_counter()
            certs: list[CertifiedMap] = []
            for index, x, _ in data.batches(self.num_samples):
                certs.append(self._certify(model, method, x, data.seed, index))  # seeded by sample index
                progress(1)
            cert = CertifiedMap.concatenate(certs)  # this process's share
            certified_s = time.perf_counter() - started
            started = time.perf_counter()
            attack = self.attacks[name]
            empirical = [[] for _ in self.attack_radii]
            kept = [[] for _ in self.attack_radii]
            floor = []
            offset = 0
            for index, x, _ in data.batches(self.num_samples):
                rows = slice(offset, offset + len(x))
                target = cert.target[rows]
                configured = with_seed(sweep(attack, self.attack_radii, len(x)), data.seeds(index, copies))
                result = configured.run(model, stacked(x, copies), stacked(target, copies))
                moved_index = torch.cat([index * copies + e for e in range(copies)])  # (radius e, sample i)
                moved = self._certify(model, method, result.x_adv, data.seed + 1_000_003, moved_index,
                                      self.eval_draws, stacked(target, copies))  # fmt: skip
                again = self._certify(model, method, x, data.seed + 2_000_003, index, self.eval_draws, target)
                clean_maps = cert.smoothed[rows]
                for e in range(copies):
                    part = slice(e * len(x), (e + 1) * len(x))
                    value = M.topk_intersection(clean_maps, moved.smoothed[part], cert.k)
                    ok = result.kept[part].cpu()
                    empirical[e].append(torch.where(ok, value, float("nan")))
                    kept[e].append(ok.float())
                floor.append(M.topk_intersection(clean_maps, again.smoothed, cert.k))
                offset += len(x)
                progress(1)
            cert = CertifiedMap.concatenate(data.gather([cert]))  # every process's share, in sample order
            empirical = [data.gather(per_radius) for per_radius in empirical]
            kept = [data.gather(per_radius) for per_radius in kept]
            floor = data.gather(floor)
            out["cost"][f"{name} certify"] = round(certified_s, 3)
            out["cost"][f"{name} attack"] = round(time.perf_counter() - started, 3)
            out["certified"][name] = self._entry(cert, empirical, kept, torch.cat(floor), data.seed, repr(attack))
        return out

    def _entry(self, cert, empirical, kept, floor, seed, attack) -> dict[str, Any]:
        per_radius = {
            "certified_topk_fraction": [cert.certified_topk_fraction(r) for r in self.radii],
            "certified_pixel_fraction": [cert.certified_pixel_fraction(r) for r in self.radii],
            "certified_top_fraction": [cert.certified_top_fraction(r) for r in self.radii],
        }
        entry: dict[str, Any] = {"radius": self.radii}
        for key, values in per_radius.items():
            entry[key] = [mean_interval(v, seed).as_dict() for v in values]
        attacked = {r: torch.cat(v) for r, v in zip(self.attack_radii, empirical, strict=True)}
        entry["empirical_topk"] = [
            mean_interval(attacked[r], seed).as_dict() if r in attacked else None for r in self.radii
        ]
        entry["empirical_label_kept"] = {
            _radius_label(r): proportion_interval(torch.cat(k)).as_dict()
            for r, k in zip(self.attack_radii, kept, strict=True)
        }
        entry["noise_floor"] = mean_interval(floor, seed).as_dict()
        entry["max_radius"] = cert.max_radius
        entry["k"], entry["n0"], entry["eval_draws"] = cert.k, cert.n0, self.eval_draws
        entry["attack"] = attack
        entry["per_sample"] = {
            _radius_label(r): {
                "certified_topk_fraction": values_list(cert.certified_topk_fraction(r)),
                "certified_pixel_fraction": values_list(cert.certified_pixel_fraction(r)),
                "empirical_topk": values_list(attacked[r]),
            }
            for r in self.attack_radii
        }
        return entry

    def paired_values(self, result):
        return {
            (("method", method), ("radius", radius), ("metric", metric)): (values, True)
            for method, entry in result["certified"].items()
            for radius, metrics in entry["per_sample"].items()
            for metric, values in metrics.items()
        }

    def render(self, results, context):
        out = Rendered()
        first = next(iter(results.values()))
        methods = list(first["certified"])
        styles = {
            "certified_topk_fraction": ("-", "certified top-k (Levine)"),
            "certified_top_fraction": ("--", "certified top pixels (Anani)"),
            "certified_pixel_fraction": (":", "certified pixels (Anani)"),
        }

        def draw(ax, method):
            for j, (name, r) in enumerate(results.items()):
                entry = r["certified"][method]
                for key, (ls, label) in styles.items():
                    est = [Estimate.of(e) for e in entry[key]]
                    mean = np.array([e.mean for e in est])
                    low = np.array([e.ci_low for e in est])
                    high = np.array([e.ci_high for e in est])
                    ax.plot(entry["radius"], mean, ls, color=f"C{j}", label=f"{name}: {label}")
                    ax.fill_between(entry["radius"], low, high, color=f"C{j}", alpha=0.12, lw=0)
                points = [(rad, Estimate.of(e)) for rad, e in zip(entry["radius"], entry["empirical_topk"],
                                                                   strict=True) if e is not None]  # fmt: skip
                ax.errorbar([p[0] for p in points], [p[1].mean for p in points],
                            yerr=error_bars([p[1] for p in points]), fmt="o", capsize=3, color=f"C{j}",
                            label=f"{name}: top-k after the L2 worst case")  # fmt: skip
                ax.axhline(entry["noise_floor"]["mean"], color=f"C{j}", lw=0.8, alpha=0.5,
                           label=f"{name}: top-k noise floor")  # fmt: skip

        fig = method_panels(methods, draw, "fraction", xlabel="L2 radius (pixel units)", extra_width=4.2)
        out.figures.append(("certified fractions (lower bounds), attacked top-k (upper bound) vs L2 radius", fig))
        out.say(
            f"Certificates of the sparsified smoothed map (sigma {first['sigma']:g}, n = {first['n']} draws, "
            f"{100 * (1 - first['alpha']):g}% confidence): with that probability over the draws, the certified share "
            "holds for every perturbation of L2 norm up to the radius, for the clean prediction's map. The attack "
            "finds one perturbation: its top-k intersection is an upper bound on the worst case, the certificate a "
            "lower bound. Radii are L2; an L-infinity budget of e/255 on an HxW image reaches L2 norm "
            "e/255 * sqrt(C*H*W), so these radii are not comparable to the L-infinity epsilons of the other sections."
        )
        rows = []
        for name, r in results.items():
            for method, entry in r["certified"].items():
                for i, radius in enumerate(entry["radius"]):
                    emp = entry["empirical_topk"][i]
                    rows.append([name, method, _radius_label(radius),
                                 *[Estimate.of(entry[key][i]) for key in CERTIFIED],
                                 Estimate.of(emp) if emp is not None else "-"])  # fmt: skip
                maxima = entry["max_radius"]
                out.say(
                    f"{name}, {method}: noise floor of the top-k {Estimate.of(entry['noise_floor'])} (two estimates "
                    f"of {entry['eval_draws']} draws at the clean input); with n = {r['n']} no certificate exceeds "
                    f"L2 {maxima['levine']:.3g} (Levine) or {maxima['anani']:.3g} (Anani)."
                )
        header = ["model", "method", "L2 radius", "certified top-k (Levine)", "certified pixels (Anani)",
                  "certified top pixels (Anani)", "top-k after L2 worst case"]  # fmt: skip
        caption = ("mean [bootstrap 95% interval] over the audited samples; certified values are lower bounds, the "
                   "attacked value an upper bound")  # fmt: skip
        out.tables.append(Table(header, rows, caption))
        comparisons = comparisons_of(context, self.name)
        for c in comparisons:
            if c["metric"] == "certified_topk_fraction":
                out.say(describe(c, f"{c['method']} certified top-k fraction at L2 {c['radius']}"))
        if comparisons:
            out.tables.append(
                comparison_table(comparisons, ["method", "radius", "metric"], "paired differences on the same samples")
            )
        costs = [[name, m, r["cost"][f"{m} certify"], r["cost"][f"{m} attack"]]
                 for name, r in results.items() for m in r["certified"]]  # fmt: skip
        out.tables.append(Table(["model", "method", "certify (s)", "attack (s)"], costs, "cost"))
        return out
