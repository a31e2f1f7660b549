"""The SVM stage's window labels with and without difficult objects (SVMConfig.use_difficult)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sppdet.datasets import ImageRecord
from sppdet.errors import ConfigError
from sppdet.svm import SVMConfig
from sppdet.train import _labelled, _positive_windows


def test_difficult_objects_count_for_svm_labels_only_when_asked():
    gt = np.array([[10, 10, 60, 60], [100, 10, 150, 60]], np.float32)
    rec = ImageRecord("a", Path("/x/a.jpg"), 200, 100, gt, np.array([0, 1]), [False, True])
    props = np.array([[12, 12, 58, 58], [101, 11, 149, 59], [0, 70, 20, 90]], np.float32)
    proposals = SimpleNamespace(boxes_for=lambda image_id: props)

    class DS(list):
        classes = ("c0", "c1")

    ((_, plain, labels),) = _labelled(DS([rec]), proposals)
    ((_, full, labels_all),) = _labelled(DS([rec]), proposals, use_difficult=True)
    assert labels.tolist() == [0] and labels_all.tolist() == [0, 1]
    # the window on the difficult class-1 object: a class-1 negative (IoU 0) unless difficult
    # objects are used, then it overlaps its ground truth (not a negative)
    assert plain.class_iou[1, 1] == 0.0
    assert full.class_iou[1, 1] > 0.9
    # the class-0 window is labelled the same either way
    np.testing.assert_allclose(plain.class_iou[0, 0], full.class_iou[0, 0])


def _two_object_image():
    gt = np.array([[10, 10, 60, 60], [100, 10, 150, 60]], np.float32)
    rec = ImageRecord("a", Path("/x/a.jpg"), 200, 100, gt, np.array([0, 1]), [False, False])
    props = np.array(
        [
            [12, 12, 58, 58],  # IoU 0.85 with the class-0 object
            [10, 10, 45, 60],  # IoU 0.70 with it
            [100, 10, 130, 60],  # IoU 0.60 with the class-1 object
            [0, 70, 20, 90],  # background
        ],
        np.float32,
    )
    return rec, SimpleNamespace(boxes_for=lambda image_id: props), props


def test_svm_positives_are_the_gt_boxes_alone_by_default():
    rec, proposals, _ = _two_object_image()
    boxes, labels = _positive_windows(rec, proposals, SVMConfig(), 2)
    np.testing.assert_array_equal(boxes, rec.boxes)
    assert labels.tolist() == [0, 1]


@pytest.mark.parametrize(("pos_iou", "extra"), [(0.8, [0]), (0.65, [0, 1]), (0.5, [0, 1, 2])])
def test_svm_pos_iou_adds_the_proposals_over_an_object_with_its_class(pos_iou, extra):
    rec, proposals, props = _two_object_image()
    boxes, labels = _positive_windows(rec, proposals, SVMConfig(pos_iou=pos_iou), 2)
    np.testing.assert_array_equal(boxes, np.concatenate([rec.boxes, props[extra]]))
    assert labels.tolist() == [0, 1] + [[0, 0, 1][i] for i in extra]


def test_svm_pos_iou_below_neg_iou_is_refused():
    with pytest.raises(ConfigError, match="pos_iou"):
        SVMConfig(pos_iou=0.2)
