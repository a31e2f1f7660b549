"""Fault injection: ``extract`` and ``train`` killed (SIGKILL) at random points and rerun give
the same outputs, byte for byte, as an uninterrupted run (issue 20).

Each command runs as its own process (``python -m sppdet_cli.main``, one thread) on a tiny
synthetic dataset with the end-to-end test's config; kill points are drawn from a seeded
generator over the uninterrupted command's own duration, so they land in proposals, conv maps,
fine-tuning (checkpoints every 10 steps), SVM mining and box regression alike.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli_e2e import CONFIG

ROOT = Path(__file__).resolve().parents[1]
#: Everything the stages make that later stages or users read (logs with timings excluded).
OUTPUTS = (
    "proposals/train.npz",
    "features/train/**/*.npy",
    "finetune/model.pt",
    "finetune/log.jsonl",
    "svm_fc7/svm.npz",
    "bbox/bbox.npz",
)
KILLS_PER_COMMAND = 2


def _sppdet(args: list, kill_after: float | None = None) -> float | None:
    """Run ``sppdet ARGS`` in a new process; return its seconds. With ``kill_after``: SIGKILL it
    then if it is still running (and return None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sppdet_cli.main", *map(str, args)]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    assert proc.returncode == 0, f"sppdet {' '.join(cmd[3:])} failed:\n{out.decode()}"
    return time.monotonic() - start


def _digests(run: Path) -> dict[str, str]:
    files = sorted(p for pattern in OUTPUTS for p in run.glob(pattern))
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    cfg = root / "cfg.yaml"
    cfg.write_text(CONFIG)
    _sppdet(["make-synthetic", root / "data", "--images", 12, "--size", "96x96", "--seed", 1])
    extract = ["extract", "--devkit", root / "data", "--split", "train", "--config", cfg]
    run = root / "reference"
    seconds = {
        "extract": _sppdet([*extract, "--out", run]),
        "train": _sppdet(["train", run, "--quiet"]),
    }
    digests = _digests(run)
    assert len(digests) > 6 and "finetune/model.pt" in digests and "bbox/bbox.npz" in digests
    return {"root": root, "extract": extract, "run": run, "seconds": seconds, "digests": digests}


@pytest.mark.parametrize("command", ["extract", "train"])
def test_a_killed_command_rerun_gives_the_uninterrupted_outputs(reference, command):
    rng = np.random.default_rng(20 if command == "extract" else 21)
    killed = 0
    for k, frac in enumerate(rng.uniform(0.3, 0.95, KILLS_PER_COMMAND)):
        run = reference["root"] / f"{command}_{k}"
        if command == "train":  # from the reference's extraction, nothing trained
            shutil.copytree(reference["run"], run, ignore=shutil.ignore_patterns("finetune",
                            "svm_*", "bbox", ".locks"))  # fmt: skip
            args = ["train", run, "--quiet"]
        else:
            args = [*reference["extract"], "--out", run]
        killed += _sppdet(args, kill_after=frac * reference["seconds"][command]) is None
        if command == "extract":
            _sppdet(args)  # the rerun resumes
        _sppdet(["train", run, "--quiet"])
        assert _digests(run) == reference["digests"], f"killed after {frac:.0%} of {command}"
    assert killed  # at least one kill interrupted the command (else the test proves nothing)
