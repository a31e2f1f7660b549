"""The SVM stage's window labels with and without difficult objects (SVMConfig.use_difficult)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sppdet.datasets import ImageRecord
from sppdet.train import _labelled


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
