"""Atomic file writes and cache manifests.

Every file a stage writes goes to a temporary name in the same directory and is renamed into
place, so a killed job never leaves a half-written file under the final name; a stage that finds
its output file can trust it. Every cache directory holds a ``manifest.json`` with everything that
determines its content; reusing the directory with different settings is refused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sppdet.errors import CacheMismatchError

MANIFEST = "manifest.json"


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + ``os.replace`` (atomic on POSIX)."""
    _write_via_temp(path, data, exclusive=False)


def atomic_create_text(path: str | os.PathLike, text: str) -> bool:
    """Write UTF-8 ``text`` to ``path`` atomically unless ``path`` exists.

    Returns:
        True if this call created the file, False if it existed (it is left as it was). Two
        processes racing to create the same file: exactly one wins (``os.link`` refuses an
        existing name), so neither overwrites the other's.
    """
    return _write_via_temp(path, text.encode("utf-8"), exclusive=True)


def _write_via_temp(
    path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *, exclusive: bool
) -> bool:
    """Write ``data`` (bytes, or a function writing to the open file) to a temporary file
    beside ``path``, then move it there (``exclusive``: only if ``path`` does not exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes 0600 files; give the result the mode a plain open() would have.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Atomically write arrays as an uncompressed ``.npz``, streamed to disk (no copy in memory:
    an SVM mining checkpoint holds gigabytes)."""
    _write_via_temp(path, lambda f: np.savez(f, **arrays), exclusive=False)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write one array as ``.npy``, streamed to disk as :func:`atomic_save_npz`."""
    _write_via_temp(path, lambda f: np.save(f, array, allow_pickle=False), exclusive=False)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` a state_dict-like object (tensors, numbers, strings, dicts)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def canonical(obj: Any) -> Any:
    """``obj`` round-tripped through JSON (tuples -> lists, paths -> str), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def fingerprint(obj: Any) -> str:
    """A sha256 hex digest of ``obj``'s canonical JSON form."""
    text = json.dumps(canonical(obj), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted ``key: old -> new`` lines where two nested mappings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out.extend(diff(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_manifest(
    directory: str | os.PathLike,
    content: Mapping[str, Any],
    legacy: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Create ``directory/manifest.json`` holding ``content``, or verify that it matches.

    Args:
        legacy: ``{section: {key: value}}`` settings that are left out on both sides when they
            have this value: keys added since manifests were written (at their default) or
            removed since (at the one value that remains), so those manifests stay valid.

    Raises:
        CacheMismatchError: the directory was made with other settings; the message lists each
            differing key as ``key: cached -> requested``.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    new = drop_legacy(canonical(dict(content)), legacy or {})
    if path.exists():
        old = drop_legacy(read_json(path), legacy or {})
        diffs = diff(old, new)
        if diffs:
            raise CacheMismatchError(
                f"{directory} was made with other settings ({'; '.join(diffs)}); "
                "use another output directory or delete it"
            )
        return
    atomic_write_json(path, new)


def drop_legacy(manifest: dict, legacy: Mapping[str, Mapping[str, Any]]) -> dict:
    """``manifest`` without the ``{section: {key: value}}`` settings of ``legacy`` that have
    their legacy value (see :func:`check_manifest`)."""
    out = dict(manifest)
    for section, keys in legacy.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys or keys[k] != v}
    return out


def versions() -> dict[str, str]:
    """Versions of the libraries that determine numerical results."""
    import sklearn
    import torch
    import torchvision

    import sppdet

    return {
        "sppdet": sppdet.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


#: ``git status`` pathspecs of what a recorded commit vouches for: the whole tree but outputs.
_CODE_PATHS = (":(top)", ":(top,exclude)benchmarks", ":(top,exclude)results")


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit of the source tree (with ``-dirty`` if modified), or ``unknown``.

    Changes under ``benchmarks/`` and ``results/`` do not count: they are the outputs of the
    commands that record this (``make bench`` rewrites several files before its last command).
    """
    where = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *_CODE_PATHS],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
