"""A line-by-line Python port of the VOC devkit's ``VOCevaldet.m`` / ``VOCap.m``, for tests.

Independent of ``sppdet.voc_eval``: it parses the XML annotations (regexes) and the comp4 files
itself and follows the MATLAB code step by step, so a test can score detections twice and compare.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np


def read_annotation(path: Path) -> dict:
    """Minimal PASreadrecord: size and objects (class, 1-based bbox, difficult) via regexes."""
    text = path.read_text(encoding="utf-8")

    def tag(block: str, name: str) -> str:
        return re.search(rf"<{name}>\s*([^<]*?)\s*</{name}>", block).group(1)

    size = re.search(r"<size>(.*?)</size>", text, re.S).group(1)
    objects = []
    for block in re.findall(r"<object>(.*?)</object>", text, re.S):
        bndbox = re.search(r"<bndbox>(.*?)</bndbox>", block, re.S).group(1)
        bbox = [float(tag(bndbox, k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append(
            {"class": tag(block, "name"), "bbox": bbox, "difficult": tag(block, "difficult") == "1"}
        )
    return {
        "width": int(tag(size, "width")),
        "height": int(tag(size, "height")),
        "objects": objects,
    }


def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """MATLAB ``a:d:b`` (colonop.m): first half ``a + k*d``, second half ``b - k*d``."""
    n = int(math.floor((b - a) / d + 1e-10))
    out = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = b - k * d
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


def matlab_max(values: list[float]) -> float | None:
    """MATLAB ``max`` of a vector: NaNs skipped, NaN if all are NaN, ``None`` for ``[]``."""
    if not values:
        return None
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def vocevaldet(
    gtids: list[str], recs: dict, cls: str, det_path: Path, use_07: bool, variant: str = ""
) -> float:
    """Port of VOCevaldet.m (VOC2007: 11-point) and VOCap.m (``use_07=False``).

    ``variant`` (negative controls, to show the data can tell the rules apart): ``"gt"`` uses
    ``ovmax > 0.5`` (py-faster-rcnn), ``"ties"`` reverses the order of equal scores, ``"arange"``
    uses ``np.arange(0, 1.1, 0.1)`` thresholds.
    """
    gt, npos = {}, 0
    for i in gtids:
        objs = [o for o in recs[i]["objects"] if o["class"] == cls]
        gt[i] = {"BB": [o["bbox"] for o in objs], "diff": [o["difficult"] for o in objs]}
        gt[i]["det"] = [False] * len(objs)
        npos += sum(1 for o in objs if not o["difficult"])
    ids, confidence, BB = [], [], []
    for line in det_path.read_text().splitlines():  # textread('%s %f %f %f %f %f')
        if line.strip():
            f = line.split()
            ids.append(f[0])
            confidence.append(float(f[1]))
            BB.append([float(v) for v in f[2:6]])
    si = sorted(range(len(confidence)), key=lambda d: -confidence[d])  # stable, like MATLAB
    if variant == "ties":
        si = sorted(range(len(confidence)), key=lambda d: (-confidence[d], -d))
    ids, BB = [ids[d] for d in si], [BB[d] for d in si]
    nd = len(confidence)
    tp, fp = [0] * nd, [0] * nd
    for d in range(nd):
        if ids[d] not in gt:
            raise AssertionError(f'unrecognized image "{ids[d]}"')
        g = gt[ids[d]]
        bb = BB[d]
        ovmax, jmax = -math.inf, -1
        for j, bbgt in enumerate(g["BB"]):
            bi = [
                max(bb[0], bbgt[0]),
                max(bb[1], bbgt[1]),
                min(bb[2], bbgt[2]),
                min(bb[3], bbgt[3]),
            ]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= 0.5 and not (variant == "gt" and ovmax == 0.5):
            if not g["diff"][jmax]:
                if not g["det"][jmax]:
                    tp[d] = 1
                    g["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    rec, prec, ctp, cfp = [], [], 0, 0
    for d in range(nd):
        ctp, cfp = ctp + tp[d], cfp + fp[d]
        rec.append(ctp / npos)
        prec.append(ctp / (cfp + ctp) if cfp + ctp else math.nan)
    if use_07:
        ap = 0.0
        ts = np.arange(0, 1.1, 0.1).tolist() if variant == "arange" else matlab_colon(0, 0.1, 1)
        for t in ts:
            p = matlab_max([prec[k] for k in range(nd) if rec[k] >= t])
            ap = ap + (0.0 if p is None else p) / 11
        return ap
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = matlab_max([mpre[i], mpre[i + 1]])
    return sum(
        (mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1]
    )
