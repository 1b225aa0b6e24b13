"""Per-sample maths for comparing attribution maps and judging attacks. Every function takes batched
tensors with the sample on dim 0 and returns one value per sample (shape ``(N,)``).

Maps are compared as pixel maps (REFERENCE.md section 1): ``I[i, j] = sum_c |A[c, i, j]|``, rescaled to sum
to ``H * W``, the convention of the fragility papers, so our numbers are comparable to theirs.
"""

from __future__ import annotations

import torch


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


# Locality-aware metrics (Kamath, Mittal, Deshpande & Balasubramanian 2024, "Rethinking Robustness of Model
# Attributions", AAAI; LENS): a top-k pixel that moves to a neighbouring pixel is a local shift, not a rewritten
# explanation. The definitions follow the authors' code (ksandeshk/LENS, eval_with_lens_attribution_attack.py) on the
# 2-D pixel grid: their flat-index window wraps across image rows and drops pixel 0, ours is a w x w square clipped at
# the border.


def _window(window: int) -> int:
    if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
        raise ValueError(f"the LENS window must be a positive odd integer (3: a 3x3 neighbourhood), got {window!r}")
    return window


def dilate(mask: torch.Tensor, window: int = 3) -> torch.Tensor:
    """(N, H, W) boolean mask grown to every pixel within the ``window`` x ``window`` square around a set pixel."""
    window = _window(window)
    if window == 1:
        return mask.bool()
    grown = torch.nn.functional.max_pool2d(mask.float().unsqueeze(1), window, stride=1, padding=window // 2)
    return grown.squeeze(1) > 0


def lens_recall(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """w-LENS-recall@k: the share of b's top-k pixels within a ``window`` neighbourhood of a's top k (the authors'
    ``|N_w(topk(a)) ∩ topk(b)| / k``). ``window=1`` is the top-k intersection."""
    both = dilate(topk_mask(maps_a, k), window) & topk_mask(maps_b, k)
    return _flat(both).sum(dim=1).to(maps_a.dtype) / k


def lens_precision(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """w-LENS-precision@k: the share of a's top-k pixels within a ``window`` neighbourhood of b's top k."""
    both = topk_mask(maps_a, k) & dilate(topk_mask(maps_b, k), window)
    return _flat(both).sum(dim=1).to(maps_a.dtype) / k


def diverse_topk_mask(maps: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """Top-k-div: greedily the largest pixel not within a ``window`` neighbourhood of one already taken, k times (or
    until none is left), so the set spreads over the image's parts instead of one blob. Batched over samples: k
    steps of an argmax, whatever the image size."""
    window = _window(window)
    n, h, w = maps.shape
    flat = _flat(maps).float()
    if not 0 < k <= flat.shape[1]:
        raise ValueError(f"k must be in [1, {flat.shape[1]}], got {k}")
    free = torch.ones_like(flat, dtype=torch.bool)
    chosen = torch.zeros_like(free)
    rows = torch.arange(n, device=maps.device)
    half = window // 2
    shifts = [(dr, dc) for dr in range(-half, half + 1) for dc in range(-half, half + 1)]
    for _ in range(k):
        index = flat.masked_fill(~free, -torch.inf).argmax(dim=1)
        live = free[rows, index]
        if not live.any():
            break
        chosen[rows[live], index[live]] = True
        r, c = index // w, index % w
        for dr, dc in shifts:
            rr, cc = r + dr, c + dc
            inside = live & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            free[rows[inside], (rr * w + cc)[inside]] = False
    return chosen.reshape(maps.shape)


def _div_share(set_a: torch.Tensor, set_b: torch.Tensor, size: torch.Tensor, dtype) -> torch.Tensor:
    return _flat(set_a & set_b).sum(dim=1).to(dtype) / size.clamp_min(1).to(dtype)


def topk_div_intersection(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """``|div(a) ∩ div(b)| / |div(a)|`` of the two maps' top-k-div sets (`diverse_topk_mask`)."""
    a, b = diverse_topk_mask(maps_a, k, window), diverse_topk_mask(maps_b, k, window)
    return _div_share(a, b, _flat(a).sum(dim=1), maps_a.dtype)


def lens_recall_div(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """w-LENS-recall@k-div: the share of b's top-k-div pixels within a neighbourhood of a's top-k-div set."""
    a, b = diverse_topk_mask(maps_a, k, window), diverse_topk_mask(maps_b, k, window)
    return _div_share(dilate(a, window), b, _flat(a).sum(dim=1), maps_a.dtype)


def lens_precision_div(maps_a: torch.Tensor, maps_b: torch.Tensor, k: int, window: int = 3) -> torch.Tensor:
    """w-LENS-precision@k-div: the share of a's top-k-div pixels within a neighbourhood of b's top-k-div set."""
    a, b = diverse_topk_mask(maps_a, k, window), diverse_topk_mask(maps_b, k, window)
    return _div_share(a, dilate(b, window), _flat(b).sum(dim=1), maps_a.dtype)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of each entry (1-based) with ties given their average rank, as scipy.stats.rankdata."""
    n = values.shape[1]
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_group.cumsum(dim=1) - 1  # group index of each sorted entry
    position = torch.arange(1, n + 1, device=values.device, dtype=torch.float64).expand_as(ordered)
    total = torch.zeros_like(position).scatter_add_(1, group, position)
    count = torch.zeros_like(position).scatter_add_(1, group, torch.ones_like(position))
    ranks_sorted = (total / count.clamp_min(1)).gather(1, group)
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def spearman(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample (average ranks for ties; NaN for a constant map), as
    scipy.stats.spearmanr. O(n log n) per sample, batched, on the maps' device."""
    a, b = _average_ranks(_flat(maps_a).double()), _average_ranks(_flat(maps_b).double())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    out = (a * b).sum(dim=1) / (a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)).sqrt()
    return out.to(maps_a.dtype if maps_a.is_floating_point() else torch.float32)


def _tied_pairs(ordered: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Per row, the number of pairs within runs of equal neighbours (``same[:, i]``: entry i+1 equals entry i)."""
    new_group = torch.ones(ordered.shape, dtype=torch.bool, device=ordered.device)
    new_group[:, 1:] = ~same
    group = new_group.cumsum(dim=1) - 1
    count = torch.zeros(ordered.shape, dtype=torch.float64, device=ordered.device)
    count.scatter_add_(1, group, torch.ones_like(count))
    return (count * (count - 1) / 2).sum(dim=1)


def _inversions(values: torch.Tensor) -> torch.Tensor:
    """Per row, the number of pairs i < j with values[i] > values[j]: bottom-up merge counting, each level
    answered for all blocks at once with a batched binary search (O(n log^2 n), no Python loop over entries)."""
    rows, n = values.shape
    size = 1 << max(0, (n - 1).bit_length())
    pad = torch.full((rows, size - n), float("inf"), dtype=values.dtype, device=values.device)
    blocks = torch.cat([values, pad], dim=1)  # padding at the end adds no inversion
    total = torch.zeros(rows, dtype=torch.float64, device=values.device)
    width = 1
    while width < size:
        pairs = blocks.view(rows, size // (2 * width), 2, width)  # each half already sorted
        left, right = pairs[:, :, 0].contiguous(), pairs[:, :, 1].contiguous()
        not_greater = torch.searchsorted(left, right, right=True)  # left entries <= each right entry
        total += (width - not_greater).flatten(1).sum(dim=1).double()
        blocks = pairs.reshape(rows, size // (2 * width), 2 * width).sort(dim=2).values.reshape(rows, size)
        width *= 2
    return total


def kendall_tau(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b per sample, equal to scipy.stats.kendalltau (ties included; NaN for a constant map).

    Knight's method: sort by (a, b), count the discordant pairs as the inversions of b in that order, and correct
    for ties in a, in b and in both. O(n log^2 n) per sample, batched, on the maps' device: two 224 x 224 maps take
    milliseconds (a pairwise O(n^2) method takes minutes)."""
    a, b = _flat(maps_a).double(), _flat(maps_b).double()
    n = a.shape[1]
    by_b = b.argsort(dim=1, stable=True)
    order = by_b.gather(1, a.gather(1, by_b).argsort(dim=1, stable=True))  # lexicographic by (a, b)
    a_sorted, b_sorted = a.gather(1, order), b.gather(1, order)
    same_a = a_sorted[:, 1:] == a_sorted[:, :-1]
    a_ties = _tied_pairs(a_sorted, same_a)
    both_ties = _tied_pairs(a_sorted, same_a & (b_sorted[:, 1:] == b_sorted[:, :-1]))
    b_ordered = b.sort(dim=1).values
    b_ties = _tied_pairs(b_ordered, b_ordered[:, 1:] == b_ordered[:, :-1])
    discordant = _inversions(b_sorted)
    pairs = n * (n - 1) / 2
    tau = (pairs - a_ties - b_ties + both_ties - 2 * discordant) / ((pairs - a_ties) * (pairs - b_ties)).sqrt()
    return tau.to(maps_a.dtype if maps_a.is_floating_point() else torch.float32)


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
