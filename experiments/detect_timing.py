"""How long ``sppdet detect`` takes with a model file, proposals included (issue 19's goal).

Two measurements, one after the other on the same machine:

1. Whole commands, as a user runs them: ``sppdet detect IMAGE`` once per image (a new process
   each time: Python, torch and model loading included), then one ``sppdet detect`` on all the
   images together (start-up paid once).
2. Inside one process: seconds to import torch + sppdet, to load the model, and each image's
   :class:`~sppdet.detect.Detector.detect` call split by stage (selective search included),
   the first image apart (it loads the numba kernel from its cache).

Usage::

    python -m experiments.detect_timing --out benchmarks/detect_lite0_epyc_vnni.json \\
        IMAGE [IMAGE ...]

Both use ``detect``'s defaults (``--fc-dtype auto``, the model's conv dtype) unless
``--fc-dtype`` / ``--conv-dtype`` are given. Writes the timings, the detections' top classes,
the machine and the commit to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _command_seconds(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, done.stdout


def _top_classes(stdout: str) -> dict[str, str | None]:
    """Image -> its highest-scoring class in ``sppdet detect``'s printout (None if none)."""
    out: dict[str, str | None] = {}
    image = None
    for line in stdout.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("detections"):
            image = line.rsplit(":", 1)[0]
            out[image] = None
        elif image is not None and out[image] is None and line.strip():
            out[image] = line.split()[0]  # printed best first
    return out


def commands(exe: str, images: list[str], extra: list[str]) -> dict:
    """Wall seconds of one ``sppdet detect`` per image, then of one on all images."""
    per_image = {}
    for im in images:
        per_image[im], _ = _command_seconds([exe, "detect", im, *extra])
    together, stdout = _command_seconds([exe, "detect", *images, *extra])
    return {
        "one_image_per_command_seconds": per_image,
        "one_image_per_command_mean": statistics.mean(per_image.values()),
        "all_images_one_command_seconds": together,
        "all_images_one_command_per_image": together / len(images),
        "top_class": _top_classes(stdout),
    }


def in_process(images: list[str], test: dict, threads: int) -> dict:
    """Import, load and per-image stage seconds inside this process."""
    t0 = time.perf_counter()
    import torch

    from sppdet.imageio import load_image
    from sppdet.predict import detector_for
    from sppdet.timing import StageTimer

    torch.set_num_threads(threads)
    t1 = time.perf_counter()
    detector = detector_for(test=test)
    t2 = time.perf_counter()
    rows = []
    for im in images:
        image = load_image(im)
        timer = StageTimer()
        a = time.perf_counter()
        dets = detector.detect(image, hook=timer)
        rows.append({
            "image": im,
            "size": list(image.shape[:2]),
            "seconds": time.perf_counter() - a,
            "stages": dict(timer.seconds),
            "kept_after_nms": len(dets.scores),  # before the score threshold
        })  # fmt: skip
    warm = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    return {
        "import_seconds": t1 - t0,
        "load_model_seconds": t2 - t1,
        "fc_dtype": detector.config.fc_dtype,
        "conv_dtype": detector.extractor.config.conv_dtype,
        "images": rows,
        "first_image_seconds": rows[0]["seconds"],
        "later_images_mean_seconds": statistics.mean(warm),
        "later_images_max_seconds": max(warm),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fc-dtype", default="auto")
    p.add_argument("--conv-dtype", help="default: the model's (as detect)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    exe = shutil.which("sppdet") or str(Path(sys.executable).with_name("sppdet"))
    extra = ["--fc-dtype", args.fc_dtype, "--threads", str(args.threads)]
    if args.conv_dtype is not None:
        extra += ["--conv-dtype", args.conv_dtype]
    record = {"what": "sppdet detect with the shipped model file, proposals computed"}
    record["commands"] = commands(exe, args.images, extra)
    record["in_process"] = in_process(
        args.images, {"fc_dtype": args.fc_dtype, "conv_dtype": args.conv_dtype}, args.threads
    )
    from sppdet.bench import provenance
    from sppdet.model_file import default_model_path
    from sppdet.storage import atomic_write_json, file_sha256

    record["model_sha256"] = file_sha256(default_model_path())
    record.update(provenance(["python", "-m", "experiments.detect_timing"]))
    atomic_write_json(args.out, record)
    c, ip = record["commands"], record["in_process"]
    print(json.dumps(c["top_class"], indent=1))
    print(
        f"one command per image: {c['one_image_per_command_mean']:.2f} s mean; all in one "
        f"command: {c['all_images_one_command_per_image']:.2f} s per image; in process: import "
        f"{ip['import_seconds']:.2f} s, load {ip['load_model_seconds']:.2f} s, detect "
        f"{ip['later_images_mean_seconds']:.2f} s mean (max {ip['later_images_max_seconds']:.2f}) "
        f"after the first ({ip['first_image_seconds']:.2f} s); fc {ip['fc_dtype']}, conv "
        f"{ip['conv_dtype']}"
    )


if __name__ == "__main__":
    main()
