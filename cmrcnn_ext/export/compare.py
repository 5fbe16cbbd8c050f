"""Comparing two models' one-image outputs ``(boxes, scores, classes, masks)``: the check
that an exported model gives the eager model's predictions (``cmrcnn-export`` and the tests)."""

import torch


def match_detections(a, b, tol=1e-4):
    """Indices ``perm`` with ``b[perm]`` in the order of ``a``: detection i of ``a`` is paired
    with the one of ``b`` of the same class whose box and score are closest (largest absolute
    difference). Detections with (nearly) equal scores may come out of NMS / sorting in a
    different order in different runtimes; this pairs them up. Returns None when the counts
    differ or some detection has no partner within ``tol``."""
    boxes_a, scores_a, classes_a = a[:3]
    boxes_b, scores_b, classes_b = b[:3]
    if len(boxes_a) != len(boxes_b):
        return None
    if len(boxes_a) == 0:
        return torch.zeros(0, dtype=torch.long)
    dist = (boxes_a[:, None] - boxes_b[None]).abs().amax(-1)
    dist = torch.maximum(dist, (scores_a[:, None] - scores_b[None]).abs())
    dist[classes_a[:, None] != classes_b[None]] = float("inf")
    diag = dist.diagonal()
    if bool((diag <= tol).all()):  # same order: the usual case
        return torch.arange(len(boxes_a))
    perm = dist.argmin(1)
    if len(set(perm.tolist())) != len(perm) or not bool((dist.min(1).values <= tol).all()):
        return None
    return perm


def compare_outputs(a, b, tol=1e-4):
    """Compare two (boxes, scores, classes, masks) tuples (``a`` the reference).

    Detections are paired with :func:`match_detections` (order of equal scores may differ).
    Returns a dict with the counts, whether the order is the same, the largest box / score /
    mask-probability differences or the fraction of differing mask pixels (bool masks), and
    ``ok``: same count, every detection paired (same class, box and score within ``tol``),
    mask probabilities within ``tol`` or bool masks with < 0.1 % of pixels different.
    """
    a = [t.detach().cpu() for t in a]
    b = [t.detach().cpu() for t in b]
    res = {"n": (len(a[0]), len(b[0]))}
    perm = match_detections(a, b, tol)
    if perm is None or a[3].shape[1:] != b[3].shape[1:]:
        res["ok"] = False
        return res
    b = [t[perm] for t in b]
    res["same_order"] = bool(torch.equal(perm, torch.arange(len(perm))))
    res["classes_equal"] = bool(torch.equal(a[2], b[2]))
    res["boxes"] = float((a[0] - b[0]).abs().max()) if len(a[0]) else 0.0
    res["scores"] = float((a[1] - b[1]).abs().max()) if len(a[0]) else 0.0
    if a[3].dtype == torch.bool:
        res["mask_pixels_differ"] = float((a[3] != b[3]).float().mean()) if a[3].numel() else 0.0
        mask_ok = res["mask_pixels_differ"] < 1e-3
    else:
        res["masks"] = float((a[3].float() - b[3].float()).abs().max()) if a[3].numel() else 0.0
        mask_ok = res["masks"] <= tol
    res["ok"] = res["classes_equal"] and res["boxes"] <= tol and res["scores"] <= tol and mask_ok
    return res
