"""Acceptance check of ``sppdet eval`` against an independent port of the VOC devkit.

Makes synthetic detections over a real VOC split (jittered ground truth at several noise levels,
boxes with "+1" IoU exactly 0.5, exact and jittered duplicates, detections on difficult objects,
confusions with other classes, random boxes, scores with many ties), writes them as comp4 files
with ``sppdet.comp4.write_comp4``, runs the ``sppdet eval`` command in a subprocess, and
compares each class's AP (VOC2007 11-point and VOC2010 all-point) with a line-by-line Python port
of the devkit's ``VOCevaldet.m`` / ``VOCap.m`` that parses the XML and comp4 files itself.
Exits 1 if any class differs by more than ``--tol``.

Usage:
    .venv/bin/python scripts/check_voc_eval.py --devkit ../shared/data/VOCdevkit --split val \
        --out runs/eval_check
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sppdet.comp4 import write_comp4
from sppdet.datasets import VOC_CLASSES
from sppdet.storage import atomic_write_json, git_commit
from sppdet.voc_eval import Detections

# ------------------------------------------------- devkit port (independent of sppdet.voc_eval)


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
            raise SystemExit(f'unrecognized image "{ids[d]}"')
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


# ----------------------------------------------------------------- synthetic detections


def _clip(box: np.ndarray, w: int, h: int) -> np.ndarray | None:
    b = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
    return b if b[2] - b[0] >= 1 and b[3] - b[1] >= 1 else None


def _half_iou_box(g: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """A box containing ``g`` with twice its area ("+1" IoU exactly 0.5), inside the image."""
    gw, gh = g[2] - g[0], g[3] - g[1]
    for cand in ([g[0], g[1], g[2] + gw, g[3]], [g[0] - gw, g[1], g[2], g[3]],
                 [g[0], g[1], g[2], g[3] + gh], [g[0], g[1] - gh, g[2], g[3]]):  # fmt: skip
        if cand[0] >= 0 and cand[1] >= 0 and cand[2] <= w and cand[3] <= h:
            return np.array(cand, np.float32)
    return None


def _object_detections(rng, g, difficult, w, h) -> list[tuple[np.ndarray, float]]:
    """(box, quality in [0, 1]) of one object (internal box ``g``): jittered, duplicated, ..."""
    out = []
    size = np.array([g[2] - g[0], g[3] - g[1]] * 2)
    n = int(rng.choice([0, 1, 1, 1, 2, 3])) + int(difficult)
    for _ in range(n):
        sigma = rng.choice([0.03, 0.1, 0.2, 0.35])
        box = g + rng.normal(0, sigma, 4) * size
        if rng.random() < 0.5:
            box = np.round(box)  # integer VOC coordinates: exact-tie arithmetic
        out.append((_clip(box, w, h), 1.0 - 2 * sigma))
    if rng.random() < 0.15:
        out.append((g.copy(), 1.0))  # exact, possibly a duplicate of a good jittered one
    if rng.random() < 0.08:
        out.append((_half_iou_box(g, w, h), 0.5))
    return [(b, q) for b, q in out if b is not None]


def make_detections(gtids, recs, classes, seed: int, n_random: int) -> dict[str, Detections]:
    """Synthetic detections of every class (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_class: dict[str, tuple[list, list, list]] = {c: ([], [], []) for c in classes}
    for i in gtids:
        w, h = recs[i]["width"], recs[i]["height"]
        for o in recs[i]["objects"]:
            g = np.array(o["bbox"], np.float32) - np.array([1, 1, 0, 0], np.float32)
            target = o["class"]
            if rng.random() < 0.05:  # confusion: detected as another class
                target = classes[int(rng.integers(len(classes)))]
            for b, q in _object_detections(rng, g, o["difficult"], w, h):
                per_class[target][0].append(i)
                per_class[target][1].append(b)
                per_class[target][2].append(q if target == o["class"] else 0.0)
    out = {}
    for c in classes:
        ids, boxes, quality = per_class[c]
        for _ in range(n_random):
            i = gtids[int(rng.integers(len(gtids)))]
            w, h = recs[i]["width"], recs[i]["height"]
            xy = rng.uniform(0, [w - 2, h - 2])
            b = _clip(np.r_[xy, xy + rng.uniform(2, [w, h])], w, h)
            if b is not None:
                ids.append(i)
                boxes.append(b)
                quality.append(0.0)
        # Better boxes score higher on average, so AP spans a realistic range (about 0.2-0.6).
        scores = 0.6 * np.array(quality) + 0.4 * rng.random(len(ids))
        ties = rng.random(len(ids)) < 0.5
        scores[ties] = np.round(scores[ties], 3)  # many equal scores: order must follow the file
        perm = rng.permutation(len(ids))
        out[c] = Detections(np.array(ids)[perm], scores[perm], np.array(boxes)[perm])
    return out


# ------------------------------------------------------------------------------------- main


def run_cli(devkit: Path, split: str, det_dir: Path, json_out: Path, use_07: bool) -> float:
    """Run ``sppdet eval`` (the installed command; or the click command directly if the lead has
    not registered it yet) and return its wall time."""
    args = ["eval", "--voc2007", "--devkit", str(devkit), "--split", split]
    args += ["--detections", str(det_dir), "--json", str(json_out)]
    args += [] if use_07 else ["--use-2010-metric"]
    exe = shutil.which("sppdet", path=str(Path(sys.executable).parent))
    registered = (
        exe and subprocess.run([exe, "eval", "--help"], capture_output=True).returncode == 0
    )
    if registered:
        cmd = [exe, *args]
    else:
        print("note: `sppdet eval` is not registered; running sppdet_cli.eval_cmd.command")
        code = "import sys; from sppdet_cli.eval_cmd import command; command(sys.argv[1:])"
        cmd = [sys.executable, "-c", code, *args[1:]]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devkit", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--year", default="2007")
    ap.add_argument("--out", type=Path, default=Path("runs/eval_check"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-per-class", type=int, default=1500)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--report", type=Path, help="Also write the report here (e.g. benchmarks/).")
    args = ap.parse_args()
    t_start = time.perf_counter()
    root = args.devkit / f"VOC{args.year}"
    gtids = (root / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    recs = {i: read_annotation(root / "Annotations" / f"{i}.xml") for i in gtids}
    dets = make_detections(gtids, recs, VOC_CLASSES, args.seed, args.random_per_class)
    det_dir = args.out / "comp4"
    write_comp4(det_dir, args.split, VOC_CLASSES, dets)
    n_obj = sum(len(r["objects"]) for r in recs.values())
    print(f"{len(gtids)} images, {n_obj} objects, {sum(map(len, dets.values()))} detections")

    report, worst, failed = {}, 0.0, False
    for use_07, tag in ((True, "voc07"), (False, "voc10")):
        json_out = args.out / f"sppdet_{tag}.json"
        cli_s = run_cli(args.devkit, args.split, det_dir, json_out, use_07)
        ours = json.loads(json_out.read_text())["ap"]
        t0 = time.perf_counter()
        ref = {c: vocevaldet(gtids, recs, c, det_dir / f"comp4_det_{args.split}_{c}.txt", use_07)
               for c in VOC_CLASSES}  # fmt: skip
        ref_s = time.perf_counter() - t0
        print(f"\n{tag}: sppdet eval {cli_s:.2f} s (subprocess), devkit port {ref_s:.2f} s")
        print(f"{'class':<12} {'sppdet':>10} {'devkit':>10} {'|diff|':>9}")
        for c in VOC_CLASSES:
            diff = abs(ours[c] - ref[c]) if ours[c] is not None else math.inf
            worst, failed = max(worst, diff), failed or not diff <= args.tol
            print(f"{c:<12} {ours[c]:10.6f} {ref[c]:10.6f} {diff:9.2e}")
        mean = sum(ref.values()) / len(ref)
        print(f"{'mAP':<12} {json.loads(json_out.read_text())['map']:10.6f} {mean:10.6f}")
        report[tag] = {"sppdet": ours, "devkit_port": ref, "cli_seconds": cli_s}
        for variant in ("gt", "ties") + (("arange",) if use_07 else ()):
            alt = [vocevaldet(gtids, recs, c, det_dir / f"comp4_det_{args.split}_{c}.txt",
                              use_07, variant) for c in VOC_CLASSES]  # fmt: skip
            gap = max(abs(a - ref[c]) for a, c in zip(alt, VOC_CLASSES, strict=True))
            print(f"negative control {variant!r}: max |AP - devkit| = {gap:.2e}")
            report[tag][f"control_{variant}"] = gap
    report["max_abs_diff"] = worst
    report["total_seconds"] = time.perf_counter() - t_start
    report.update(
        ok=not failed,
        commit=git_commit(),
        command=" ".join(["python", *sys.argv]),
        devkit=str(args.devkit),
        split=args.split,
    )
    atomic_write_json(args.out / "report.json", report)
    if args.report is not None:
        atomic_write_json(args.report, report)
    print(f"\nmax |diff| = {worst:.3e} (tol {args.tol:g}); total {report['total_seconds']:.1f} s")
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
