"""MODEL.CMRCNN.PREFIX_NMS: the same detections as Detectron2's fast_rcnn_inference."""

import pytest
import torch
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

import cmrcnn_ext.modeling.box_inference as bi
from cmrcnn_ext.modeling.box_inference import fast_rcnn_inference_prefix, prefix_batched_nms


def candidates(rows, classes, per_class_boxes=True, seed=0, clusters=6, size=(480, 640)):
    """Stage outputs like a cascade's: boxes (R, 4*C or 4) around a few object centres, so that
    NMS suppresses most of them, and softmax scores (R, C + 1)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    centres = torch.rand(clusters, 2, generator=g) * torch.tensor([w, h])
    n_box = classes if per_class_boxes else 1
    c = centres[torch.randint(0, clusters, (rows, n_box), generator=g)]
    c = c + torch.randn(rows, n_box, 2, generator=g) * 6
    wh = 20 + torch.rand(rows, n_box, 2, generator=g) * 60
    boxes = torch.cat([c - wh / 2, c + wh / 2], -1).reshape(rows, n_box * 4)
    boxes[:3] += torch.tensor([-40.0, -40.0, 40.0, 40.0]).repeat(n_box)  # beyond the image: clipped
    scores = torch.softmax(torch.randn(rows, classes + 1, generator=g) * 2, 1)
    return boxes, scores, size


def assert_same(ours, theirs):
    """Same detections in the same (decreasing score) order. Among candidates with exactly equal
    scores (thousands of near-zero scores at threshold 0) neither implementation defines an
    order, so those are compared as sets."""
    (r1, i1), (r2, i2) = ours, theirs
    for a, b, ia, ib in zip(r1, r2, i1, i2):
        assert len(a) == len(b)
        assert torch.equal(a.scores, b.scores)

        def rows(inst, idx):
            return sorted(
                zip(
                    inst.scores.tolist(),
                    idx.tolist(),
                    inst.pred_classes.tolist(),
                    map(tuple, inst.pred_boxes.tensor.tolist()),
                )
            )

        assert rows(a, ia) == rows(b, ib)
        if len(set(a.scores.tolist())) == len(a):  # no ties: identical order too
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
            assert torch.equal(a.pred_classes, b.pred_classes) and torch.equal(ia, ib)


@pytest.mark.parametrize(
    "rows,classes,per_class", [(1000, 80, True), (300, 5, True), (200, 5, False), (50, 3, True)]
)
@pytest.mark.parametrize("thresh,topk", [(0.0, 100), (0.05, 100), (0.0, 10), (0.3, 100), (0.0, -1)])
def test_equals_detectron2(rows, classes, per_class, thresh, topk):
    for seed in range(3):
        boxes, scores, size = candidates(rows, classes, per_class, seed=seed)
        args = (
            [boxes, boxes[: rows // 2]],
            [scores, scores[: rows // 2]],
            [size, size],
            thresh,
            0.5,
            topk,
        )
        ours = fast_rcnn_inference_prefix(*args)
        assert_same(ours, fast_rcnn_inference(*args))
        if topk > 0:
            assert all(len(r) <= topk for r in ours[0])


def test_prefix_grows_until_enough_survive(monkeypatch):
    """Heavy suppression: the first prefix keeps too few boxes, the prefix grows, and the result
    is still Detectron2's."""
    monkeypatch.setattr(bi, "MIN_PREFIX", 16)
    monkeypatch.setattr(bi, "PREFIX_FACTOR", 2)
    calls = []
    real_nms = bi.nms
    monkeypatch.setattr(bi, "nms", lambda b, s, t: calls.append(len(b)) or real_nms(b, s, t))
    boxes, scores, size = candidates(400, 2, seed=4, clusters=1)
    for topk in (20, 50):
        calls.clear()
        args = ([boxes], [scores], [size], 0.0, 0.5, topk)
        ours = fast_rcnn_inference_prefix(*args)
        assert len(calls) > 1 and calls == sorted(calls), calls  # grew at least once
        assert calls[0] == 2 * topk  # max(PREFIX_FACTOR * topk, MIN_PREFIX)
        assert_same(ours, fast_rcnn_inference(*args))
    assert calls[-1] == 800 and len(ours[0][0]) == 48  # every candidate: only 48 survive


def test_non_finite_rows_and_no_candidates():
    boxes, scores, size = candidates(100, 5, seed=2)
    boxes[5, 2] = float("nan")
    scores[7, 1] = float("inf")
    args = ([boxes, boxes], [scores, scores], [size, size], 0.05, 0.5, 100)
    assert_same(fast_rcnn_inference_prefix(*args), fast_rcnn_inference(*args))
    args = ([boxes], [scores], [size], 1.0, 0.5, 100)  # no score above 1
    (res,), (rows,) = fast_rcnn_inference_prefix(*args)
    assert len(res) == 0 and rows.shape == (0,)
    assert prefix_batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 10
    ).shape == (0,)


def test_classes_never_suppress_each_other():
    """Identical boxes of different classes all survive; of the same class, only the best."""
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(6, 1)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    keep = prefix_batched_nms(box, scores, classes, 0.5, 100)
    assert keep.tolist() == [0, 1, 2]
    assert prefix_batched_nms(box, scores, classes, 0.5, 2).tolist() == [0, 1]
