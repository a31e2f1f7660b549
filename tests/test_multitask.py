"""Multi-task fine-tuning (Fast R-CNN section 2.3): the head's box layer trained with the
classifier (``finetune.bbox_loss_weight``) and applied at test time (``bbox.method:
finetuned``); the loss against a float64 reference, the targets of flipped windows, and the
whole chain on the tiny synthetic data of tests/test_cli_e2e.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sppdet.bbox_reg import BBoxRegressor, encode
from sppdet.errors import ConfigError
from sppdet.finetune import box_loss
from sppdet.finetune_batch import _flipped, candidates
from sppdet.head import BBOX_TARGET_STD, FCHead, head_box_regressor, head_from_state, load_head
from sppdet.imageio import load_image
from sppdet.model import load_detector
from sppdet.run import Run
from sppdet_cli.main import cli
from tests import test_cli_e2e
from tests.test_cli_e2e import invoke
from tests.test_model_file import detect_json, val_images

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run


def smooth_l1_reference(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def test_box_loss_equals_a_float64_reference():
    rng = np.random.default_rng(0)
    k, b = 3, 7
    deltas = rng.normal(0, 2, (b, 4 * k))
    labels = np.array([0, 1, 3, 0, 2, 2, 0])
    targets = rng.normal(0, 0.3, (b, 4))
    want = 0.0
    for i in range(b):
        if labels[i] == 0:
            continue  # background: no box loss, but it counts in B
        c = labels[i] - 1
        for j in range(4):
            want += smooth_l1_reference(deltas[i, 4 * c + j] - targets[i, j] / BBOX_TARGET_STD[j])
    got = box_loss(torch.tensor(deltas), torch.tensor(labels), torch.tensor(targets))
    assert float(got) == pytest.approx(want / b, rel=1e-12)
    none = box_loss(torch.tensor(deltas), torch.zeros(b, dtype=torch.long), torch.tensor(targets))
    assert float(none) == 0.0


class _Record:
    def __init__(self, boxes, labels):
        self.boxes = np.asarray(boxes, np.float32)
        self.labels = np.asarray(labels, np.int64)
        self.difficult = np.zeros(len(labels), bool)


def test_window_targets_and_their_mirror_images():
    """Each foreground window's target maps it onto its ground truth; a mirrored window's is
    the target of the mirrored boxes (x -> W - x): tx negated, the rest unchanged."""
    width = 200.0
    rec = _Record([[20, 30, 120, 150], [130, 10, 190, 80]], [4, 1])
    props = np.array([[25, 35, 125, 140], [135, 15, 185, 90], [0, 0, 60, 60], [22, 28, 110, 160]])
    w = candidates(rec, props.astype(np.float32), 0, _Cfg())
    fg = slice(0, w.num_fg)
    gt_of = [int(np.argmax([_iou(b, g) for g in rec.boxes])) for b in w.boxes[fg]]
    want = encode(w.boxes[fg].astype(np.float64), rec.boxes[gt_of].astype(np.float64))
    np.testing.assert_allclose(w.targets[fg], want, rtol=1e-6, atol=1e-7)
    assert not w.targets[w.num_fg :].any()  # background rows
    np.testing.assert_array_equal(w.labels[fg], rec.labels[gt_of] + 1)

    def mirror(b):
        return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)

    flipped = encode(mirror(w.boxes[fg].astype(np.float64)), mirror(rec.boxes[gt_of]))
    np.testing.assert_allclose(_flipped(w.targets[fg], True), flipped, rtol=1e-6, atol=1e-6)
    assert _flipped(w.targets, False) is w.targets


class _Cfg:
    fg_iou, bg_iou_low = 0.5, 0.1


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_box_layer_shares_the_classifiers_dropout_and_files():
    torch.manual_seed(0)
    head = FCHead(12, 8, 3, bbox_head=True)
    x = torch.randn(5, 12)
    torch.manual_seed(1)
    logits, deltas = head.forward_multi(x)
    torch.manual_seed(1)
    np.testing.assert_array_equal(head(x).detach().numpy(), logits.detach().numpy())
    assert deltas.shape == (5, 12)
    back = head_from_state(head.config(), head.state_dict())
    assert back.config()["bbox_head"] is True
    torch.testing.assert_close(back.bbox_pred.weight, head.bbox_pred.weight)
    plain = FCHead(12, 8, 3)
    assert "bbox_head" not in plain.config() and "bbox_pred.weight" not in plain.state_dict()
    with pytest.raises(ConfigError, match="box-regression layer"):
        plain.forward_multi(x)
    with pytest.raises(ConfigError, match="bbox_loss_weight"):
        head_box_regressor(plain)


def test_the_box_layer_as_regressors_gives_its_own_deltas():
    torch.manual_seed(0)
    head = FCHead(12, 8, 3, bbox_head=True).eval()
    torch.nn.init.normal_(head.bbox_pred.weight, std=0.3)
    torch.nn.init.normal_(head.bbox_pred.bias, std=0.3)
    fc7 = head.embed(torch.randn(6, 12), "fc7")
    reg = head_box_regressor(head)
    assert reg.layer == "fc7" and reg.feature_scale == 1.0
    want = head.bbox_pred(fc7).reshape(6, 3, 4) * torch.tensor(BBOX_TARGET_STD)
    torch.testing.assert_close(reg.deltas_all_tensor(fc7), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def multitask_run(trained, tmp_path_factory):
    """A run fine-tuned with the box layer, its boxes from that layer."""
    root = tmp_path_factory.mktemp("multitask")
    cfg = root / "cfg.yaml"
    text = test_cli_e2e.CONFIG.replace("finetune:\n", "finetune:\n  bbox_loss_weight: 1.0\n")
    cfg.write_text(text + "bbox:\n  method: finetuned\n")
    run = root / "run"
    invoke("extract", "--devkit", trained["data"], "--split", "train", "--out", run,
           "--config", cfg)  # fmt: skip
    invoke("train", run, "--quiet")
    return run


def test_multitask_run_trains_and_detects_with_its_box_layer(trained, multitask_run, tmp_path):
    run = multitask_run
    head = load_head(run / "finetune/model.pt")
    assert head.bbox_pred is not None
    reg = BBoxRegressor.load(run / "bbox/bbox.npz")
    np.testing.assert_array_equal(reg.weights, head_box_regressor(head).weights)
    manifest = json.loads((run / "bbox/manifest.json").read_text())
    assert manifest["bbox"]["method"] == "finetuned" and "finetune_model" in manifest
    ft = json.loads((run / "finetune/manifest.json").read_text())
    assert ft["finetune"]["bbox_loss_weight"] == 1.0
    # the box layer moved from its initialisation (sigma 0.001) and detection applies it
    assert float(head.bbox_pred.weight.detach().abs().max()) > 0.005
    image = val_images(trained, 1)[0]
    assert detect_json(tmp_path, image, "--run", run, "--fc-dtype", "float32")
    test = dataclasses.replace(Run.open(run).config.test, fc_dtype="float32", score_threshold=-9)
    with_boxes = load_detector(Run.open(run), test)
    without = load_detector(Run.open(run), dataclasses.replace(test, bbox_reg=False))
    pixels = load_image(image)
    a, b = with_boxes.detect(pixels), without.detect(pixels)
    assert len(a.boxes) and not np.array_equal(a.boxes, b.boxes)


def test_finetuned_boxes_need_a_head_with_a_box_layer(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    shutil.rmtree(run / "bbox")
    cfg = (run / "config.yaml").read_text().replace("method: ridge", "method: finetuned")
    (run / "config.yaml").write_text(cfg)
    res = CliRunner().invoke(cli, ["train-bbox", str(run), "--quiet"])
    assert res.exit_code != 0 and "bbox_loss_weight" in res.output
