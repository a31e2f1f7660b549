"""``sppdet proposals --import ... --recall`` against an independent recall computation.

Imports the shared precomputed boxes (``../shared/data/proposals``) for the VOC2007 val split,
and recomputes recall at IoU 0.5 / 0.7 and the average best overlap from the raw ``.npz`` (ids /
offsets / uint16 0-based inclusive boxes) and the VOC XML files directly (numpy + ElementTree,
nothing from sppdet), with VOC "+1" areas. Skipped without ``../shared``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppdet_cli.main import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEVKIT = SHARED / "VOCdevkit"
PROPOSALS = SHARED / "proposals" / "voc2007_trainval_ss_fast.npz"
#: The committed report of the whole val split (the figures of docs/results.md).
COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "proposals_val_imported.json"

pytestmark = pytest.mark.skipif(
    not (DEVKIT / "VOC2007").is_dir() or not PROPOSALS.is_file(),
    reason="needs ../shared/data (VOCdevkit and proposals)",
)


def gt_boxes(xml: Path) -> list[list[float]]:
    """Non-difficult boxes as 0-based inclusive pixels (VOC's are 1-based inclusive)."""
    out = []
    for obj in ET.parse(xml).getroot().iter("object"):
        diff = obj.find("difficult")
        if diff is not None and int(diff.text) == 1:
            continue
        bb = obj.find("bndbox")
        out.append([float(bb.find(k).text) - 1 for k in ("xmin", "ymin", "xmax", "ymax")])
    return out


def best_overlaps(gt: np.ndarray, props: np.ndarray) -> np.ndarray:
    """Best "+1" IoU of each GT box over the proposals (both 0-based inclusive)."""
    best = np.zeros(len(gt))
    if len(props) == 0:
        return best
    area_p = (props[:, 2] - props[:, 0] + 1) * (props[:, 3] - props[:, 1] + 1)
    for i, g in enumerate(gt):
        iw = np.minimum(g[2], props[:, 2]) - np.maximum(g[0], props[:, 0]) + 1
        ih = np.minimum(g[3], props[:, 3]) - np.maximum(g[1], props[:, 1]) + 1
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        area_g = (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
        best[i] = (inter / (area_g + area_p - inter)).max()
    return best


def independent_recall(ids: list[str]) -> dict[str, float]:
    root = DEVKIT / "VOC2007"
    with np.load(PROPOSALS) as data:
        index = {str(k): i for i, k in enumerate(data["ids"])}
        offsets, boxes = data["offsets"], data["boxes"].astype(np.float64)
    best = []
    for image_id in ids:
        i = index[image_id]
        gt = np.array(gt_boxes(root / "Annotations" / f"{image_id}.xml")).reshape(-1, 4)
        best.append(best_overlaps(gt, boxes[offsets[i] : offsets[i + 1]]))
    best = np.concatenate(best)
    return {
        "recall_0.5": float((best >= 0.5).mean()),
        "recall_0.7": float((best >= 0.7).mean()),
        "abo_all": float(best.mean()),
        "gt_boxes": len(best),
    }


def test_imported_proposal_recall_equals_an_independent_count(tmp_path):
    report = tmp_path / "recall.json"
    args = ["proposals", "--devkit", str(DEVKIT), "--split", "val", "--import", str(PROPOSALS)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run"), "--json", str(report)])
    assert result.exit_code == 0, result.output
    ours = json.loads(report.read_text())
    ids = (DEVKIT / "VOC2007" / "ImageSets" / "Main" / "val.txt").read_text().split()
    ref = independent_recall(ids)
    assert ours["images"] == len(ids) and ours["gt_boxes"] == ref["gt_boxes"]
    for key in ("recall_0.5", "recall_0.7", "abo_all"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    # and the committed figures are still what the code computes
    committed = json.loads(COMMITTED.read_text())
    for key in ("recall_0.5", "recall_0.7", "abo_all", "mabo", "boxes_per_image", "gt_boxes"):
        assert ours[key] == pytest.approx(committed[key], abs=1e-9), key
