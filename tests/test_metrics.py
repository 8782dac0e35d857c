import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from segprune.engine.metrics import (
    ClassificationMetric,
    SegmentationMetric,
    confusion_matrix,
    top1_accuracy,
)

IGN = 255

# 4 classes; class 3 appears in neither target nor prediction -> IoU NaN.
TARGET = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 2, 1, IGN],
        [2, 2, IGN, IGN],
    ]
)
PRED = torch.tensor(
    [
        [0, 1, 1, 1],
        [0, 2, 0, 3],  # pred under an ignore pixel is irrelevant (even class 3)
        [2, 1, 2, 0],
    ]
)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, num_classes=4)
    # gt 0: pixels (0,0)->0, (0,1)->1, (1,0)->0        => [2,1,0,0]
    # gt 1: (0,2)->1, (0,3)->1, (1,2)->0               => [1,2,0,0]
    # gt 2: (1,1)->2, (2,0)->2, (2,1)->1               => [0,1,2,0]
    expected = torch.tensor([[2, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    # batched (N, H, W) form gives the same counts
    assert torch.equal(confusion_matrix(PRED[None], TARGET[None], 4), expected)


def test_miou_pixel_acc_per_class_by_hand():
    m = SegmentationMetric(4, class_names=["a", "b", "c", "d"])
    m.update(PRED[None], TARGET[None])
    r = m.compute()
    # IoU_0 = 2/(3+3-2)=0.5 ; IoU_1 = 2/(3+4-2)=0.4 ; IoU_2 = 2/(3+2-2)=2/3 ; IoU_3 = NaN
    iou = [0.5, 0.4, 2 / 3]
    assert r["per_class_iou"]["a"] == pytest.approx(iou[0])
    assert r["per_class_iou"]["b"] == pytest.approx(iou[1])
    assert r["per_class_iou"]["c"] == pytest.approx(iou[2])
    assert r["per_class_iou"]["d"] is None
    assert r["miou"] == pytest.approx(sum(iou) / 3)  # NaN class excluded
    assert r["pixel_acc"] == pytest.approx(6 / 9)  # ignore pixels excluded
    assert r["mean_acc"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
    assert r["confusion"][0] == [2, 1, 0, 0]


def test_default_class_keys_are_indices():
    m = SegmentationMetric(4)
    m.update(PRED[None], TARGET[None])
    assert set(m.compute()["per_class_iou"]) == {"0", "1", "2", "3"}


def test_class_absent_in_gt_but_predicted_counts_as_zero():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 2, 1, 1]]])
    m = SegmentationMetric(3)
    m.update(pred, target)
    r = m.compute()
    assert r["per_class_iou"]["2"] == 0.0  # false positives only -> IoU 0, not NaN
    assert r["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_invalid_labels_raise():
    with pytest.raises(ValueError, match="7"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, IGN]]), 4)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(torch.tensor([[0, 4]]), torch.tensor([[0, 1]]), 4)
    with pytest.raises(ValueError):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(TypeError):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 4)


def test_logits_path_equals_pred_path_same_size():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    target[:, :2] = IGN
    a, b = SegmentationMetric(5), SegmentationMetric(5)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert a.compute() == b.compute()


def test_logits_are_upsampled_bilinearly():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    a, b = SegmentationMetric(3), SegmentationMetric(3)
    a.update(logits, target)
    b.update(up.argmax(1), target)
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.sum() == 2 * 64


def test_logits_channel_mismatch_raises():
    with pytest.raises(ValueError, match="channels"):
        SegmentationMetric(3).update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_accumulation_equals_concatenation_and_reset():
    g = torch.Generator().manual_seed(2)
    p1, p2 = torch.randint(0, 4, (2, 6, 6), generator=g), torch.randint(0, 4, (3, 6, 6), generator=g)
    t1, t2 = torch.randint(0, 4, (2, 6, 6), generator=g), torch.randint(0, 4, (3, 6, 6), generator=g)
    t2[0, 0] = IGN
    acc, once = SegmentationMetric(4), SegmentationMetric(4)
    acc.update(p1, t1)
    acc.update(p2, t2)
    once.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert acc.compute() == once.compute()
    # split-level mIoU is not the mean of per-batch mIoUs in general; check reset
    acc.reset()
    assert acc.confusion.sum() == 0


label_maps = st.integers(min_value=1, max_value=6).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.integers(0, 2**31 - 1),
        st.integers(1, 3),
        st.integers(1, 8),
        st.integers(1, 8),
    )
)


@settings(max_examples=60, deadline=None)
@given(label_maps, st.integers(1, 8))
def test_property_range_perfect_and_ignore_invariance(params, extra_w):
    c, seed, n, h, w = params
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=g)
    pred = torch.randint(0, c, (n, h, w), generator=g)

    m = SegmentationMetric(c)
    m.update(pred, target)
    r = m.compute()
    assert 0.0 <= r["miou"] <= 1.0
    assert 0.0 <= r["pixel_acc"] <= 1.0

    perfect = SegmentationMetric(c)
    perfect.update(target.clone(), target)
    assert perfect.compute()["miou"] == 1.0
    assert perfect.compute()["pixel_acc"] == 1.0

    # adding ignore pixels (with arbitrary predictions) changes nothing
    extra_t = torch.full((n, h, extra_w), IGN, dtype=torch.long)
    extra_p = torch.randint(0, c, (n, h, extra_w), generator=g)
    t_mixed = torch.cat([target, extra_t], dim=2)
    p_mixed = torch.cat([pred, extra_p], dim=2)
    m2 = SegmentationMetric(c)
    m2.update(p_mixed, t_mixed)
    r2 = m2.compute()
    assert r2["confusion"] == r["confusion"]
    assert r2["miou"] == r["miou"] or (math.isnan(r2["miou"]) and math.isnan(r["miou"]))


def test_empty_metric_is_nan_not_crash():
    r = SegmentationMetric(3).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"])
    assert all(v is None for v in r["per_class_iou"].values())


def test_class_names_length_checked():
    with pytest.raises(ValueError):
        SegmentationMetric(3, class_names=["a", "b"])


def test_top1_and_classification_metric():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([1, 1, 1])
    assert top1_accuracy(logits, target) == 2
    m = ClassificationMetric()
    m.update(logits, target)
    m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    r = m.compute()
    assert r["count"] == 4
    assert r["top1"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        top1_accuracy(logits, torch.tensor([1, 1]))


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8), c=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_confusion_matrix_properties(n, h, w, c, seed):
    """Total = non-ignored pixels; row sums = ground-truth class counts; column sums = predicted
    counts over those pixels; the diagonal = correct pixels; a perfect prediction is diagonal."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = IGN
    pred = torch.randint(0, c, (n, h, w), generator=g)
    cm = confusion_matrix(pred, target, c, IGN)
    valid = target != IGN
    assert cm.shape == (c, c) and cm.dtype == torch.int64
    assert int(cm.sum()) == int(valid.sum())
    assert torch.equal(cm.sum(1), torch.bincount(target[valid], minlength=c))
    assert torch.equal(cm.sum(0), torch.bincount(pred[valid], minlength=c))
    assert int(cm.diag().sum()) == int((pred[valid] == target[valid]).sum())
    perfect = confusion_matrix(torch.where(valid, target, 0), target, c, IGN)
    assert torch.equal(perfect, torch.diag(torch.bincount(target[valid], minlength=c)))
