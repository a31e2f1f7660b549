"""The settings of a run config that name files: stored absolute, compared resolved.

A new run's ``config.yaml`` stores :data:`PATH_SETTINGS` absolute (made so against the working
directory, which is what a relative path meant when typed), so its later stages work from any
working directory. Runs made before store them as typed, relative to the directory they were
made from, which the run does not know: those are still read from the working directory, and one
that is not found there is an error saying so (:func:`stored_path`). Two configs' paths compare
resolved (:func:`absolute_paths` with ``resolve``), so an old run's relative path and a new
absolute one of the same file are the same setting. Results files record the paths relative to
the working directory (:func:`relative_paths`), as the committed ``configs/*.yaml`` name them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from sppdet.configutil import merge
from sppdet.errors import ConfigError

__all__ = ["PATH_SETTINGS", "absolute_paths", "check_paths_exist", "relative_paths", "stored_path"]

T = TypeVar("T")

#: ``(section, key)`` of the settings that name files or directories.
PATH_SETTINGS = (
    ("data", "devkit"),
    ("data", "coco"),
    ("data", "images"),
    ("data", "classes"),
    ("data", "proposals"),
    ("features", "weights"),
)

#: ``features.weights`` values that are not files.
_WEIGHTS_KEYWORDS = ("random", "imagenet")


def is_path(section: str, key: str, value: Any) -> bool:
    """Whether ``value`` of the setting ``section.key`` names a file or directory."""
    if (section, key) not in PATH_SETTINGS or not isinstance(value, str):
        return False
    return not (section == "features" and value in _WEIGHTS_KEYWORDS)


def absolute_paths(config: T, *, resolve: bool = False) -> T:
    """A run config (dataclass) with its :data:`PATH_SETTINGS` absolute, against the working
    directory.

    Args:
        resolve: resolve symbolic links too (to compare two configs' paths); else the path is
            only made absolute, ``..`` removed where that keeps its meaning.
    """
    changes: dict[str, dict[str, str]] = {}
    for section, key in PATH_SETTINGS:
        value = getattr(getattr(config, section), key)
        if is_path(section, key, value):
            changes.setdefault(section, {})[key] = _absolute(value, resolve)
    return merge(config, changes, "paths") if changes else config


def check_paths_exist(config: Any) -> None:
    """Every file or directory a run config names exists (checked before a run is written).

    Raises:
        ConfigError: naming the setting and the path.
    """
    for section, key in PATH_SETTINGS:
        value = getattr(getattr(config, section), key)
        if is_path(section, key, value) and not os.path.exists(value):
            raise ConfigError(f"{section}.{key}: {value} does not exist")


def relative_paths(data: Mapping[str, Any], start: str | Path | None = None) -> dict[str, Any]:
    """A config mapping (as ``config.yaml`` holds it) with its absolute :data:`PATH_SETTINGS`
    relative to ``start`` (default: the working directory).

    Results files record them so: the committed ones name ``../shared/...`` from the repository
    root, as ``configs/*.yaml`` do, and a rerun in another clone must record the same config.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    base = Path.cwd() if start is None else Path(start)
    for section, key in PATH_SETTINGS:
        value = out.get(section, {}).get(key)
        if is_path(section, key, value) and os.path.isabs(value):
            out[section][key] = os.path.relpath(value, base)
    return out


def stored_path(value: str | None, setting: str, config_file: str | Path) -> str | None:
    """``value`` of the path setting ``setting`` as ``config_file`` stores it, checked.

    The error does not suggest editing the path into an absolute one: the trained stages'
    manifests hold the ``data`` section as it was, and would refuse the edited run.

    Raises:
        ConfigError: a relative path (a run made before paths were stored absolute) that does
            not exist from the working directory.
    """
    if value is None or os.path.isabs(value) or os.path.exists(value):
        return value
    raise ConfigError(
        f"{config_file}: {setting} {value!r} is relative to the directory the run was made in "
        f"and is not found from {Path.cwd()}: run sppdet from that directory"
    )


def _absolute(value: str, resolve: bool) -> str:
    path = Path(value)
    if resolve:
        return str(path.resolve())
    if path.is_absolute():
        return value
    tidy = os.path.abspath(path)
    # Dropping "link/.." from a path as typed changes it where "link" is a symbolic link to
    # another directory: such paths keep their "..".
    return tidy if Path(tidy).resolve() == path.resolve() else str(path.absolute())
