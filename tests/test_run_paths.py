"""Tests of sppdet.run_paths: a run's config.yaml stores its paths absolute; runs made before,
with paths as typed, keep opening from where they were made, and are not refused as changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sppdet.configutil import to_dict
from sppdet.errors import CacheMismatchError, ConfigError
from sppdet.run import Run, build_config
from sppdet.run_paths import absolute_paths, relative_paths

ROOT = Path(__file__).resolve().parents[1]

RELATIVE = {
    "data": {"devkit": "data/VOCdevkit", "proposals": "boxes.npz", "classes": "classes.txt"},
    "features": {"backbone": "zf5", "weights": "w.pth", "scales": [64]},
}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory holding the files ``RELATIVE`` names, and the cwd of the test."""
    work = tmp_path / "work"
    (work / "data" / "VOCdevkit").mkdir(parents=True)
    for name in ("boxes.npz", "classes.txt", "w.pth"):
        (work / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(work)
    return work


def _stored(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_new_run_stores_its_paths_absolute(work, monkeypatch):
    run = Run.create("run", build_config(**RELATIVE))
    stored = _stored(work / "run")
    assert stored["data"]["devkit"] == str(work / "data" / "VOCdevkit")
    assert stored["data"]["proposals"] == str(work / "boxes.npz")
    assert stored["data"]["classes"] == str(work / "classes.txt")
    assert stored["features"]["weights"] == str(work / "w.pth")
    assert run.config.data.devkit == stored["data"]["devkit"]  # the run in hand too
    monkeypatch.chdir(work.parent / "elsewhere")
    reopened = Run.open(work / "run")
    assert reopened.stored_path("data", "devkit") == str(work / "data" / "VOCdevkit")
    # the same settings typed from elsewhere (absolute now): the same run, not refused
    again = Run.create(work / "run", build_config(**_absolute(RELATIVE, work)))
    assert again.config == reopened.config


def test_weights_keywords_are_not_paths(work):
    Run.create("run", build_config(features={"weights": "random"}))
    assert _stored(work / "run")["features"]["weights"] == "random"
    assert _stored(work / "run")["data"]["devkit"] is None


def test_a_run_made_before_keeps_its_relative_paths_and_opens_from_there(work, monkeypatch):
    """A config.yaml of before (paths as typed): read from the working directory as before,
    not refused by the same settings given now (made absolute), refused with other ones."""
    cfg = build_config(**RELATIVE)
    (work / "old").mkdir()
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (work / "old" / "config.yaml").write_text(text)
    run = Run.open("old")
    assert run.stored_path("data", "devkit") == "data/VOCdevkit"  # as stored, read from here
    assert Run.create("old", cfg).config == run.config  # same paths, typed relative
    assert Run.create("old", build_config(**_absolute(RELATIVE, work))).config == run.config
    assert (work / "old" / "config.yaml").read_text() == text  # not rewritten
    (work / "other.pth").write_bytes(b"y")
    other = {**RELATIVE, "features": {**RELATIVE["features"], "weights": "other.pth"}}
    with pytest.raises(CacheMismatchError, match=r"features\.weights"):
        Run.create("old", build_config(**other))
    monkeypatch.chdir(work.parent / "elsewhere")
    run = Run.open(work / "old")
    with pytest.raises(ConfigError, match="data.devkit 'data/VOCdevkit' is relative") as info:
        run.dataset("train")
    message = str(info.value)
    assert "config.yaml" in message and "run sppdet from that directory" in message
    with pytest.raises(ConfigError, match="features.weights 'w.pth'"):
        run.extractor  # noqa: B018 (the property builds it)
    with pytest.raises(ConfigError, match="data.proposals 'boxes.npz'"):
        run.proposals(None)


def test_paths_compare_resolved_through_symbolic_links(work):
    (work / "link").symlink_to(work / "data")
    Run.create("run", build_config(data={"devkit": "link/VOCdevkit"}))
    assert _stored(work / "run")["data"]["devkit"] == str(work / "link" / "VOCdevkit")
    Run.create("run", build_config(data={"devkit": str(work / "data" / "VOCdevkit")}))


def test_dot_dot_after_a_symbolic_link_keeps_its_meaning(work):
    """``link/..`` is the link target's parent, not the working directory: kept as typed."""
    (work / "deep" / "er").mkdir(parents=True)
    (work / "deep" / "er" / "w.pth").write_bytes(b"z")
    (work / "jump").symlink_to(work / "deep" / "er")
    cfg = absolute_paths(build_config(features={"weights": "jump/../er/w.pth"}))
    assert Path(cfg.features.weights).resolve() == work / "deep" / "er" / "w.pth"


def test_committed_configs_resolve_against_the_repository_root(monkeypatch):
    """configs/*.yaml name ../shared/... from the repository root: a run made there stores the
    absolute paths, and results record them relative again, as the committed ones do."""
    monkeypatch.chdir(ROOT)
    configs = sorted(ROOT.glob("configs/*.yaml"))
    assert any("../shared" in p.read_text() for p in configs)
    for path in configs:
        cfg = build_config(path)
        made = absolute_paths(cfg)
        if cfg.data.devkit is not None:
            assert Path(made.data.devkit) == (ROOT / cfg.data.devkit).resolve()
        assert relative_paths(to_dict(made)) == to_dict(cfg), path


def _absolute(sections: dict, base: Path) -> dict:
    """``sections`` with the paths of ``RELATIVE`` joined to ``base``."""
    out = {k: dict(v) for k, v in sections.items()}
    for key in ("devkit", "proposals", "classes"):
        out["data"][key] = str(base / out["data"][key])
    out["features"]["weights"] = str(base / out["features"]["weights"])
    return out
