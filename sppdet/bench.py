"""``sppdet bench``: SPP-net (1 and 5 scales) against R-CNN mode, side by side (issue 7).

Every method runs on the same images with the same proposals, the same frozen backbone and the
same trained fc / SVM / box-regression stages of one run, interleaved image by image (so load
and thermal noise hit all of them alike). Per method, the seconds per image of each stage
(:data:`sppdet.detect.STAGES`, timed by a :class:`~sppdet.timing.StageTimer` hook around the
detector's steps) are averaged; the paper's speed-up is the R-CNN time over the
SPP time, excluding proposals (paper table 10 times exclude selective search too).

The first image is run once by every method before timing (oneDNN / cuDNN build their kernels
on first use). Conv maps are computed from pixels here, never read from a cache.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sppdet.data_source import DataSource
from sppdet.detect import STAGES, Detector
from sppdet.features import FeatureConfig, FeatureExtractor
from sppdet.imageio import load_image
from sppdet.model import load_detector
from sppdet.run import Run
from sppdet.scales import FIVE_SCALES, SINGLE_SCALE
from sppdet.storage import atomic_write_json, git_commit
from sppdet.timing import StageTimer
from sppdet.viz import plot_stage_times

#: method name -> feature settings over the run's (the trained stages are the run's own).
METHODS: dict[str, dict] = {
    "spp_1scale": {"mode": "spp", "scales": SINGLE_SCALE},
    "spp_5scale": {"mode": "spp", "scales": FIVE_SCALES},
    "rcnn": {"mode": "rcnn"},
}
#: Stages that count towards the detection time (proposals are excluded, as in the paper).
TIMED = tuple(s for s in STAGES if s != "proposals")


def _detector(base: Detector, run: Run, features: dict, source=None) -> Detector:
    if source is None:
        cfg = dataclasses.replace(run.config.features, **features)
        extractor = FeatureExtractor(cfg, run.device)
    else:  # a model file: its own trunk weights
        extractor = source.with_features(**features).extractor
    return Detector(
        extractor,
        base.spp,
        base.trained_head,  # not base.head: the test config's SVD / int8 are applied again
        base.svms,
        base.bbox,
        base.bbox_scale,
        base.classes,
        base.config,
        base.propose,
    )


def bench(
    run: Run,
    split: str,
    *,
    data: DataSource | str | None = None,
    limit: int = 10,
    methods: tuple[str, ...] = tuple(METHODS),
    progress: bool = True,
    rcnn_batch: int | None = None,
    source=None,
) -> dict:
    """Time each method of :data:`METHODS` on the first ``limit`` images of ``split``.

    The run's test config (scorer, SVD ranks, fc dtype, dedup) applies to every method.
    R-CNN mode runs ``rcnn_batch`` windows per conv pass (default: ``FeatureConfig``'s, the
    fastest measured here, rather than the run's, which only bounded memory at extraction).
    ``source``: a :class:`~sppdet.model_file.ModelFile` whose parts are timed (``run`` is then
    its :func:`~sppdet.model_file.model_run`), else the run's own. ``data``: the split's
    :class:`~sppdet.data_source.DataSource` (default: the run's, :meth:`Run.data_source`).

    Returns:
        A JSON-ready dict with, per method, ``stages`` (seconds per image), ``seconds_per_image``
        (sum over :data:`TIMED`), the ratios ``ratio_1scale`` / ``ratio_5scale`` (R-CNN time
        over SPP time) when both sides ran, and the machine description.
    """
    ds = run.dataset(split, data=data, limit=limit)
    if len(ds) == 0:
        raise ValueError(f"split {split} has no images")
    props = run.proposals(ds)
    base = load_detector(run if source is None else source, run.config.test, classes=ds.classes)
    batch = FeatureConfig().rcnn_batch if rcnn_batch is None else rcnn_batch
    features = {
        m: {**METHODS[m], **({"rcnn_batch": batch} if m == "rcnn" else {})} for m in methods
    }
    dets = {m: _detector(base, run, features[m], source) for m in methods}
    timers = {m: StageTimer(run.device) for m in methods}
    other = defaultdict(float)
    windows = []
    for i, rec in enumerate(tqdm(ds, desc=f"bench {split}", unit="img", disable=not progress)):
        t0 = time.perf_counter()
        image = load_image(rec.path)
        t1 = time.perf_counter()
        boxes = props.boxes_for(rec.image_id)
        other["image_load"] += t1 - t0
        other["proposals_import"] += time.perf_counter() - t1
        windows.append(len(boxes))
        for m, det in dets.items():
            if i == 0:
                det.detect(image, boxes)  # warm-up: first-use kernel creation is not timed
            det.detect(image, boxes, hook=timers[m])
    n = len(ds)
    out = {
        "split": split,
        "images": n,
        "proposals_per_image": float(np.mean(windows)),
        "image_load_seconds_per_image": other["image_load"] / n,
        "proposals_import_seconds_per_image": other["proposals_import"] / n,
        "methods": {},
    }
    for m in methods:
        stages = {s: timers[m].seconds.get(s, 0.0) / n for s in STAGES}
        out["methods"][m] = {
            "features": {k: list(v) if isinstance(v, tuple) else v for k, v in features[m].items()},
            "stages": stages,
            "seconds_per_image": sum(stages[s] for s in TIMED),
        }
        out[f"{m}_seconds_per_image"] = out["methods"][m]["seconds_per_image"]
    for m, key in (("spp_1scale", "ratio_1scale"), ("spp_5scale", "ratio_5scale")):
        if m in methods and "rcnn" in methods:
            out[key] = out["rcnn_seconds_per_image"] / out[f"{m}_seconds_per_image"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["device"] = describe_device(run.device)
    out["test_config"] = dataclasses.asdict(base.config)
    out["conv_dtype"] = run.config.features.conv_dtype  # every method's conv trunk runs in it
    out["run"] = str(run.root)
    out["run_scales"] = list(run.config.features.scales)
    out.update(provenance(["sppdet"]))
    return out


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:<name>"``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def machine() -> dict:
    """CPU model, cores, threads, torch version and GPU of this process's machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def provenance(program: list[str], commit: str | None = None) -> dict:
    """``machine``, ``commit`` (``git_commit()`` now unless given, e.g. taken when a long job
    started) and ``command`` (``program`` + this process's arguments) for a results JSON."""
    return {
        "machine": machine(),
        "commit": git_commit() if commit is None else commit,
        "command": shlex.join([*program, *sys.argv[1:]]) if sys.argv else None,
    }


def write_bench(result: dict, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` and a stacked-bar PNG of the stage times beside it."""
    out = Path(out_dir)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    atomic_write_json(json_path, result)
    stages = {m: r["stages"] for m, r in result["methods"].items()}
    plot_stage_times(stages, TIMED, png_path, title=f"{name}: seconds per image by stage")
    return json_path, png_path


def format_bench(result: dict) -> str:
    """A text table: methods as rows, stages as columns (seconds per image)."""
    head = f"{'method':<12s}" + "".join(f"{s:>8s}" for s in TIMED) + f"{'total':>9s}"
    rows = [head]
    for m, r in result["methods"].items():
        cells = "".join(f"{r['stages'][s]:8.3f}" for s in TIMED)
        rows.append(f"{m:<12s}{cells}{r['seconds_per_image']:9.3f}")
    for key in ("ratio_1scale", "ratio_5scale"):
        if key in result:
            rows.append(f"{key}: {result[key]:.1f}x (R-CNN time / SPP time, proposals excluded)")
    rows.append(
        f"{result['images']} images, {result['proposals_per_image']:.0f} proposals/image, "
        f"device {result['device']}, {result['machine']['threads']} threads, "
        f"conv {result.get('conv_dtype', 'float32')}, fc {result['test_config']['fc_dtype']}, "
        f"peak RSS {result['peak_rss_gb']:.2f} GB"
    )
    return "\n".join(rows)
