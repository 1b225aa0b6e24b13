"""Locality-aware metrics (Kamath et al. 2024, LENS): equal to a direct numpy transcription of their definitions on
the 2-D grid, plain top-k for a 1x1 neighbourhood, and registered beside the other map metrics."""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from robustattr.attacks import LinfBall, WorstCaseExplanationAttack
from robustattr.attributions import Saliency
from robustattr.metrics import (
    MAP_METRICS,
    diverse_topk_mask,
    fragility_collection,
    lens_precision,
    lens_precision_div,
    lens_recall,
    lens_recall_div,
    topk_div_intersection,
    topk_intersection,
)
from robustattr.models import SmallCNN


def _top(m: np.ndarray, k: int) -> set[tuple[int, int]]:
    order = np.argsort(-m, axis=None, kind="stable")[:k]
    return {divmod(int(i), m.shape[1]) for i in order}


def _neighbours(pixels: set, shape, w: int) -> set:
    h = w // 2
    return {(r + dr, c + dc) for r, c in pixels for dr in range(-h, h + 1) for dc in range(-h, h + 1)
            if 0 <= r + dr < shape[0] and 0 <= c + dc < shape[1]}  # fmt: skip


def _div(m: np.ndarray, k: int, w: int) -> set:
    """The greedy definition, one pixel at a time in decreasing order."""
    taken: set = set()
    for i in np.argsort(-m, axis=None, kind="stable"):
        p = divmod(int(i), m.shape[1])
        if len(taken) == k:
            break
        if p not in _neighbours(taken, m.shape, w):
            taken.add(p)
    return taken


def _reference(a: np.ndarray, b: np.ndarray, k: int, w: int) -> dict[str, float]:
    ta, tb, da, db = _top(a, k), _top(b, k), _div(a, k, w), _div(b, k, w)
    return {
        "lens_recall": len(_neighbours(ta, a.shape, w) & tb) / k,
        "lens_precision": len(ta & _neighbours(tb, a.shape, w)) / k,
        "topk_div": len(da & db) / len(da),
        "lens_recall_div": len(_neighbours(da, a.shape, w) & db) / len(da),
        "lens_precision_div": len(da & _neighbours(db, a.shape, w)) / len(db),
    }


FUNCTIONS = {
    "lens_recall": lens_recall,
    "lens_precision": lens_precision,
    "topk_div": topk_div_intersection,
    "lens_recall_div": lens_recall_div,
    "lens_precision_div": lens_precision_div,
}


@pytest.mark.parametrize(("shape", "k", "window"), [((8, 8), 8, 3), ((12, 9), 10, 3), ((16, 16), 12, 5)])
def test_lens_metrics_equal_a_numpy_transcription(shape, k, window):
    g = torch.Generator().manual_seed(sum(shape) + k)
    a = torch.rand(6, *shape, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.rand(6, *shape, generator=g, dtype=torch.float64)  # related maps: partial overlaps
    for name, fn in FUNCTIONS.items():
        got = fn(a, b, k, window).tolist()
        want = [_reference(a[i].numpy(), b[i].numpy(), k, window)[name] for i in range(len(a))]
        assert got == pytest.approx(want, abs=1e-12), name
    for i in range(len(a)):
        mask = diverse_topk_mask(a[i : i + 1], k, window)[0]
        assert {tuple(p) for p in mask.nonzero().tolist()} == _div(a[i].numpy(), k, window)


def test_a_1x1_neighbourhood_is_plain_topk_and_a_shift_by_one_pixel_is_kept_in_3x3():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(5, 8, 8, generator=g)
    b = torch.rand(5, 8, 8, generator=g)
    assert torch.equal(lens_recall(a, b, 8, 1), topk_intersection(a, b, 8))
    assert torch.equal(lens_precision(a, b, 8, 1), topk_intersection(a, b, 8))
    a[:, :, 6:] = 0  # the top k lies in columns 0..5
    shifted = torch.roll(a, shifts=1, dims=2)  # every pixel moved one column right, none wraps into the top k
    plain, local = topk_intersection(a, shifted, 8), lens_recall(a, shifted, 8)
    assert local.tolist() == [1.0] * 5  # each moved top-k pixel is a neighbour of where it was
    assert lens_precision(a, shifted, 8).tolist() == [1.0] * 5
    assert (plain < 1).all()  # the plain metric counts the same shift as damage


def test_diverse_topk_spreads_and_stops_when_the_image_is_full():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 0, 1], m[0, 3, 3] = 3.0, 2.0, 1.0  # a blob of two and a far pixel
    mask = diverse_topk_mask(m, 2)[0]
    assert mask[0, 0] and mask[3, 3] and not mask[0, 1]  # the neighbour of the first is skipped
    full = diverse_topk_mask(torch.rand(1, 4, 4), 16)[0]
    assert 1 <= int(full.sum()) <= 4  # at most four pixels of a 4x4 image are pairwise outside a 3x3 window
    with pytest.raises(ValueError, match="odd"):
        lens_recall(m, m, 2, window=2)


def test_lens_metrics_are_registered_map_metrics_in_collections_and_the_worst_case_attack():
    for name in ("lens_recall", "lens_precision", "topk_div", "lens_recall_div"):
        assert MAP_METRICS[name].higher_is_better and MAP_METRICS[name].worst == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g)
    collection = fragility_collection(k=8)
    collection.update(maps_clean=a, maps_adv=b, kept=torch.ones(4))
    values = collection.compute()
    assert values["lens_recall"].item() == pytest.approx(lens_recall(a, b, 8).mean().item())
    assert values["lens_recall"] >= values["topk_intersection"]
    model = SmallCNN(width=8, activation=partial(nn.Softplus, beta=10)).eval()
    x = torch.rand(4, 1, 8, 8, generator=g)
    y = model(x).argmax(dim=1)
    attack = WorstCaseExplanationAttack(Saliency(), LinfBall(8 / 255), "lens_recall", steps=3, restarts=1, seed=0)
    result = attack.run(model, x, y)
    assert result.metric == "lens_recall" and ((result.values >= 0) & (result.values <= 1)).all()
