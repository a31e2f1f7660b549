"""A variant of a trained run: a new run directory beside it that shares the base run's stages
which the changed settings do not touch (hard links: those files are only ever replaced by
atomic renames, never written in place), with the base's ``config.yaml`` plus the changes.
Used by ``experiments/svm_gap.sh`` and ``experiments/seed_noise.sh``::

    python -m experiments.variant BASE_RUN NEW_RUN --share proposals,features,finetune \\
        --set svm.C=0.0003 --set svm.pos_iou=0.5

Does nothing if ``NEW_RUN/config.yaml`` exists (a rerun resumes the variant); a half-made
variant (``NEW_RUN.tmp``) is made again.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml


def make_variant(base: Path, run: Path, share: list[str], sets: dict[str, object]) -> bool:
    """Create ``run`` from ``base``: ``share`` (entries of ``base``) hard-linked, ``sets``
    (``{"section.key": value}``) applied to the config. Returns False if it existed."""
    if (run / "config.yaml").exists():
        return False
    tmp = run.with_name(run.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in share:  # as cp -al: files hard-linked, symbolic links copied as links
        src = base / name
        if src.is_symlink():
            os.symlink(os.readlink(src), tmp / name)
        elif src.is_file():  # e.g. ablations.json
            os.link(src, tmp / name)
        else:
            shutil.copytree(src, tmp / name, symlinks=True, copy_function=os.link)
    cfg = yaml.safe_load((base / "config.yaml").read_text())
    for key, value in sets.items():
        section, _, name = key.partition(".")
        if section not in cfg or not name:
            raise SystemExit(f"--set {key}: not a section.key of {base}/config.yaml")
        cfg[section][name] = value
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.rename(run)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("run", type=Path)
    p.add_argument("--share", required=True, help="Comma-separated entries of BASE to share.")
    p.add_argument("--set", action="append", default=[], help="section.key=value (YAML value).")
    args = p.parse_args()
    sets = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        sets[key] = yaml.safe_load(value)
    make_variant(args.base, args.run, args.share.split(","), sets)


if __name__ == "__main__":
    main()
