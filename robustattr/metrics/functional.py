"""Per-sample maths for comparing attribution maps and judging attacks. Every function takes batched
tensors with the sample on dim 0 and returns one value per sample (shape ``(N,)``).

Maps are compared as pixel maps (REFERENCE.md section 1): ``I[i, j] = sum_c |A[c, i, j]|``, rescaled to sum
to ``H * W``, the convention of the fragility papers, so our numbers are comparable to theirs.
"""

from __future__ import annotations

import torch
from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef


def pixel_map(attribution: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) attribution -> (N, H, W) non-negative pixel map summing to H*W per sample.

    An all-zero attribution stays all zero (no division by zero)."""
    if attribution.dim() != 4:
        raise ValueError(f"pixel_map expects (N, C, H, W), got shape {tuple(attribution.shape)}")
    pixels = attribution.abs().sum(dim=1)
    total = pixels.sum(dim=(1, 2), keepdim=True)
    hw = pixels.shape[1] * pixels.shape[2]
    return pixels / total.clamp_min(torch.finfo(pixels.dtype).tiny) * hw


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(maps.shape[0], -1)


def topk_mask(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape as ``maps``) of each sample's k largest entries."""
    flat = _flat(maps)
    if not 0 < k <= flat.shape[1]:
        raise ValueError(f"k must be in [1, {flat.shape[1]}], got {k}")
    index = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
    return mask.reshape(maps.shape)


def topk_intersection(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int) -> torch.Tensor:
    """``|topk(a) ∩ topk(b)| / k`` per sample (1: same top-k features, 0: disjoint)."""
    both = topk_mask(maps_a, k) & topk_mask(maps_b, k)
    return _flat(both).sum(dim=1).to(maps_a.dtype) / k


def spearman(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample (average ranks for ties, as scipy.stats.spearmanr)."""
    a, b = _flat(maps_a).float(), _flat(maps_b).float()
    out = spearman_corrcoef(a.T, b.T)  # columns are outputs: one correlation per sample
    return out.reshape(-1)


def kendall_tau(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b per sample (as scipy.stats.kendalltau)."""
    a, b = _flat(maps_a).float(), _flat(maps_b).float()
    out = kendall_rank_corrcoef(a.T, b.T, variant="b")
    return out.reshape(-1)


def center_of_mass(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) non-negative maps -> (N, 2) centre of mass as (row, column) in pixels."""
    h, w = maps.shape[1:]
    rows = torch.arange(h, dtype=maps.dtype, device=maps.device)
    cols = torch.arange(w, dtype=maps.dtype, device=maps.device)
    total = maps.sum(dim=(1, 2)).clamp_min(torch.finfo(maps.dtype).tiny)
    r = (maps.sum(dim=2) * rows).sum(dim=1) / total
    c = (maps.sum(dim=1) * cols).sum(dim=1) / total
    return torch.stack([r, c], dim=1)


def center_shift(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of mass of two (N, H, W) maps."""
    return (center_of_mass(maps_a) - center_of_mass(maps_b)).norm(dim=1)


def cosine_distance(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` of the flattened maps, per sample."""
    return 1 - torch.nn.functional.cosine_similarity(_flat(maps_a), _flat(maps_b), dim=1)


def label_kept(pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> torch.Tensor:
    """1.0 where the perturbed input keeps the clean prediction."""
    return (pred_clean == pred_adv).float()


def robust_accuracy(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1.0 where the perturbed input is still classified correctly."""
    return (logits_adv.argmax(dim=1) == y).float()


def attack_success(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample success (1.0/0.0) over the samples the attack is judged on: for an untargeted attack, a
    clean-correct sample now misclassified (NaN for clean-misclassified samples, which are excluded); for a
    targeted attack, the target class reached."""
    if target is not None:
        return (pred_adv == target).float()
    success = (pred_adv != y).float()
    return torch.where(pred_clean == y, success, torch.full_like(success, float("nan")))


def default_k(height: int, width: int) -> int:
    """The top-k size of REFERENCE.md: 1000 for ImageNet-size inputs, 100 for 32x32, 1/8 of the pixels for
    smaller images (8 of the 64 pixels of a digit)."""
    pixels = height * width
    if pixels >= 224 * 224:
        return 1000
    if pixels >= 32 * 32:
        return 100
    return max(1, round(pixels / 8))
