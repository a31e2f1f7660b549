"""Pack what ``sppdet bench`` needs into one small folder, for a machine without ``../shared``.

The device machine (a GPU lent to some sessions, see scripts/gpu_check.sh) receives this
repository and nothing beside it, at most 64 MiB. This copies the first ``--limit`` images of a
split (JPEGs, annotations, split list), their imported proposals, the backbone weights and a
trained run's test-time stages (fine-tuned head, SVMs, box regressors, config) into ``--out``,
with the run's config pointing at the packed copies by paths relative to the repository root.

The fine-tuned head is stored in float16 (``--head-dtype``) to fit the limit: 14 M parameters,
56 MB in float32. ``load_head`` casts it back to float32 on load, so the benchmark's arithmetic
and speed are those of the original run; its scores differ from the original's only by that
rounding, and a benchmark does not use them. ``PACK.json`` records what was packed from where.

Usage::

    .venv/bin/python scripts/pack_bench.py --run runs/voc07_1s \\
        --devkit ../shared/data/VOCdevkit --split val --limit 10 --out bench_pack
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from sppdet.bench import provenance
from sppdet.errors import SppdetError
from sppdet.run import CONFIG_FILE, Run, load_yaml
from sppdet.storage import atomic_write_json, file_sha256

#: Test-time stages of a run that ``sppdet bench`` loads (``sppdet.model.load_detector``).
STAGE_DIRS = ("svm_fc7", "svm_pool5", "bbox")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="A trained run (make voc07-1scale).")
    p.add_argument("--devkit", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="Folder inside the repository.")
    p.add_argument("--head-dtype", choices=("float16", "float32"), default="float16")
    args = p.parse_args()
    run = Run.open(args.run)
    cfg = load_yaml(args.run / CONFIG_FILE)  # as written, to rewrite three paths in it
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first")
    ids = pack_devkit(args.devkit, cfg["data"]["year"], args.split, args.limit, args.out)
    proposals = pack_proposals(cfg["data"]["proposals"], ids, args.out / "proposals.npz")
    weights = args.out / "weights" / Path(cfg["features"]["weights"]).name
    weights.parent.mkdir(parents=True)
    shutil.copyfile(cfg["features"]["weights"], weights)
    pack_run(run.root, args.out / "run", args.head_dtype)
    cfg["data"].update(devkit=str(args.out / "VOCdevkit"), proposals=str(proposals))
    cfg["features"]["weights"] = str(weights)
    (args.out / "run" / CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    atomic_write_json(
        args.out / "PACK.json",
        {
            "source_run": str(args.run),
            "source_devkit": str(args.devkit),
            "split": args.split,
            "images": ids,
            "head_dtype": args.head_dtype,
            "weights_sha256": file_sha256(weights),
            "bytes": size,
            **provenance(["python", "scripts/pack_bench.py"]),
        },
    )
    print(f"{args.out}: {len(ids)} {args.split} images, {size / 2**20:.1f} MiB")
    return 0


def pack_devkit(devkit: Path, year: str, split: str, limit: int, out: Path) -> list[str]:
    """Copy the first ``limit`` images of ``split`` with their annotations; return their ids."""
    src = devkit / f"VOC{year}"
    if not src.is_dir():
        src = devkit  # --devkit may name the VOC2007 folder itself
    ids = (src / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:limit]
    dst = out / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for i in ids:
        shutil.copyfile(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages" / f"{i}.jpg")
        shutil.copyfile(src / "Annotations" / f"{i}.xml", dst / "Annotations" / f"{i}.xml")
    (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


def pack_proposals(src: str, ids: list[str], out: Path) -> Path:
    """The boxes of ``ids`` from an imported-proposals file, in the same format."""
    with np.load(src) as d:
        where = {str(k): n for n, k in enumerate(d["ids"])}
        missing = [i for i in ids if i not in where]
        if missing:
            raise SystemExit(f"{src} has no proposals for {missing[:5]}")
        offsets, boxes = d["offsets"], d["boxes"]
        parts = [boxes[offsets[where[i]] : offsets[where[i] + 1]] for i in ids]
    sizes = np.array([0] + [len(b) for b in parts], dtype=np.int64)
    np.savez_compressed(
        out, ids=np.array(ids), offsets=np.cumsum(sizes), boxes=np.concatenate(parts)
    )
    return out


def pack_run(src: Path, dst: Path, head_dtype: str) -> None:
    """The run's fine-tuned head (in ``head_dtype``) and its SVM / box-regression stages."""
    for name in STAGE_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
    (dst / "finetune").mkdir(parents=True)
    state = torch.load(src / "finetune" / "model.pt", map_location="cpu", weights_only=True)
    dtype = getattr(torch, head_dtype)
    state["model"] = {k: v.to(dtype) for k, v in state["model"].items()}
    torch.save(state, dst / "finetune" / "model.pt")
    shutil.copyfile(src / "finetune" / "manifest.json", dst / "finetune" / "manifest.json")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SppdetError, OSError) as e:  # a missing run, image, annotation or weights file
        sys.exit(f"pack_bench: {e}")
