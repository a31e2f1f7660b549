"""Does a rerun of a committed experiment reproduce its results? (issue 6's check, as code.)

A committed result (``results/<name>_<variant>.json``, written by experiments.voc07) names the
command, config and weights it came from. A reproduction reruns that command on a clean checkout
and compares, variant by variant, the mAP it gets with the committed one. It only counts as a
reproduction when the command, config and weights are the same; anything else is a different
experiment, and :func:`compare_results` refuses it rather than report a difference.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from sppdet.configutil import to_dict
from sppdet.errors import ConfigError, SppdetError
from sppdet.run import stored_run_config

# Keys that must be equal for a rerun to be a reproduction of the committed result ("config" is
# compared after both are merged onto today's defaults, see _config; "command" by its arguments,
# see _arguments).
SAME_EXPERIMENT_KEYS = ("protocol", "command", "config", "weights_sha256", "scales", "val_images")
# Config knobs that set only how fast the same numbers are computed (equal up to float rounding,
# like thread counts): a rerun may differ in them, e.g. when a later commit changed their default
# (features.rcnn_batch 64 -> 8 with stripe tiling). Left out of the config comparison.
SPEED_ONLY_KEYS = ("features.rcnn_batch", "features.stripe_pixels")
# The ways the experiment script has been invoked: as a file under scripts/ (results committed
# before the harness left the package) and as a module of experiments/.
SCRIPT_NAMES = ("scripts/voc07.py", "experiments/voc07.py", "experiments.voc07")


class NotAReproductionError(SppdetError):
    """The rerun is not the committed experiment (different command, config or weights)."""


def compare_results(
    committed: Sequence[Mapping], rerun: Sequence[Mapping], tol_points: float = 0.5
) -> dict:
    """Compare each variant's mAP and per-class AP between committed results and a rerun.

    Args:
        committed: result dicts (``results/*.json``), one per variant, of one experiment.
        rerun: the rerun's result dicts; every committed variant must be among them.
        tol_points: largest |mAP difference| in points (0..100 scale) that still reproduces.

    Returns:
        ``{"reproduced": bool, "tol_points": ..., "variants": {variant: {...}}}`` where each
        variant holds the committed and rerun mAP (points), their difference, the largest
        per-class AP difference, and both runs' commits and machines.

    Raises:
        NotAReproductionError: a variant is missing from the rerun, or the two differ in any of
            :data:`SAME_EXPERIMENT_KEYS`.
    """
    for res in (*committed, *rerun):
        if missing := [k for k in ("variant", "map", "ap") if k not in res]:
            raise NotAReproductionError(f"a result lacks {', '.join(missing)}: not from voc07.py")
    ran = {r["variant"]: r for r in rerun}
    variants = {}
    for c in sorted(committed, key=lambda r: r["variant"]):
        name = c["variant"]
        if name not in ran:
            raise NotAReproductionError(f"variant {name!r} is committed; the rerun has none")
        r = ran[name]
        for key in SAME_EXPERIMENT_KEYS:
            a, b = (_compared(x, key, name) for x in (c, r))
            if a != b:
                what = ", ".join(_differing(a, b, key)) if key == "config" else key
                raise NotAReproductionError(f"{name}: {what} differ(s) from the committed run")
        if set(c["ap"]) != set(r["ap"]):
            raise NotAReproductionError(f"{name}: the two results score different classes")
        diff = 100 * (r["map"] - c["map"])
        variants[name] = {
            "committed_map": round(100 * c["map"], 2),
            "rerun_map": round(100 * r["map"], 2),
            "diff_points": round(diff, 2),
            "max_class_ap_diff_points": round(
                max(abs(100 * (r["ap"][k] - c["ap"][k])) for k in c["ap"]), 2
            ),
            "reproduced": abs(diff) <= tol_points,
            # the same floats, not only within rounding (same CPU type, same thread counts)
            "identical": r["map"] == c["map"] and r["ap"] == c["ap"],
            "committed_commit": c.get("commit"),
            "rerun_commit": r.get("commit"),
            "committed_machine": (c.get("machine") or {}).get("cpu_model"),
            "rerun_machine": (r.get("machine") or {}).get("cpu_model"),
        }
    if not variants:
        raise NotAReproductionError("no committed results to compare")
    return {
        "reproduced": all(v["reproduced"] for v in variants.values()),
        "tol_points": tol_points,
        "variants": variants,
    }


def _compared(result: Mapping, key: str, name: str) -> Any:
    """The value of ``key`` that two results must share to be the same experiment."""
    if key == "config":
        return _config(result, name)
    if key == "command":
        return _arguments(result.get("command"))
    return result.get(key)


def _arguments(command: str | None) -> list[str] | None:
    """The command's arguments after the experiment script, however the script was invoked.

    ``python scripts/voc07.py --config c.yaml`` and ``python -m experiments.voc07 --config
    c.yaml`` run the same experiment. A command without a known script is kept whole.
    """
    if command is None:
        return None
    argv = shlex.split(command)
    for i, arg in enumerate(argv):
        if arg in SCRIPT_NAMES:
            return argv[i + 1 :]
    return argv


def _config(result: Mapping, name: str) -> dict[str, Any]:
    """The result's run config merged onto today's defaults.

    A config written before a knob existed lacks its key; merged onto the defaults it reads as
    the default, which is what the older code did (e.g. ``features.conv_dtype: float32``), or,
    for a knob whose default changed since (:data:`~sppdet.run_config.CHANGED_DEFAULTS`), as
    the value it had before. A key today's code no longer knows means the experiment cannot be
    rerun as it was. The :data:`SPEED_ONLY_KEYS` are dropped.
    """
    try:
        config = to_dict(stored_run_config(result.get("config"), f"{name} config"))
    except ConfigError as e:
        raise NotAReproductionError(str(e)) from e
    for dotted in SPEED_ONLY_KEYS:
        section, key = dotted.split(".")
        config.get(section, {}).pop(key, None)
    return config


def _differing(a: Any, b: Any, where: str) -> list[str]:
    """Dotted keys (with both values) where nested dicts ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differing(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where} ({a!r} -> {b!r})"]
