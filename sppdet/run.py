"""A run directory: its resolved config, the paths of every stage's output, shared objects.

Layout::

    RUN/config.yaml                      resolved config (written once; later stages read it)
    RUN/proposals/<split>.npz            proposals per split (computed or imported)
    RUN/features/<split>/                fp16 conv maps + manifest.json
    RUN/finetune/model.pt, metrics.json  fine-tuned fc head (state_dict)
    RUN/svm_<layer>/svm.npz              per-class linear SVMs
    RUN/bbox/bbox.npz                    per-class box regressors
    RUN/eval/<split>/                    comp4 files, eval.json, PR curves, timings
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from sppdet.configutil import merge, to_dict
from sppdet.data_source import DataSource, check_categories
from sppdet.datasets import Dataset
from sppdet.device import resolve_device
from sppdet.distributed import SINGLE, Dist
from sppdet.errors import CacheMismatchError, ConfigError, SppdetError
from sppdet.fastpath import resolve_conv_dtype
from sppdet.features import FeatureExtractor
from sppdet.head import load_trunk_top
from sppdet.image_identity import INDEX_FILE, ImageIndex
from sppdet.proposal_sources import ensure_proposals
from sppdet.proposal_store import ProposalSet
from sppdet.run_config import (  # noqa: F401  re-exported: the config is defined there
    _CACHE_SECTIONS,
    _STAGE_OUTPUTS,
    _STAGE_SECTIONS,
    CONFIG_FILE,
    REMOVED_KEYS,
    DataConfig,
    RunConfig,
    build_config,
    load_config_yaml,
    load_yaml,
    run_config,
    stored_run_config,
)
from sppdet.run_paths import absolute_paths, check_paths_exist, is_path, stored_path
from sppdet.storage import (
    atomic_create_text,
    atomic_write_text,
    canonical,
    diff,
    file_sha256,
)
from sppdet.window_features import WindowFeatures, window_features

log = logging.getLogger(__name__)


class Run:
    """A run directory with its config; the stages take one of these."""

    def __init__(self, root: str | Path, config: RunConfig) -> None:
        self.root = Path(root)
        self.config = config

    @classmethod
    def create(cls, root: str | Path, config: RunConfig) -> Run:
        """Create ``root`` with ``config``, or reopen it if its cached stages agree.

        Creation is exclusive: of two stages that create the same run at once (the train and
        val extractions side by side), one writes ``config.yaml`` and the other reopens it.
        Another setting of a later stage (:data:`_STAGE_SECTIONS`) is taken while that stage
        has not run, with a note in ``config.yaml`` and a warning; after, it is refused as
        a cached section's is. Files the config names must exist before anything is written.
        """
        root = Path(root)
        path = root / CONFIG_FILE
        config = absolute_paths(config)
        check_paths_exist(config)
        if not path.exists() and atomic_create_text(path, _config_text(config)):
            return cls(root, config)
        old = cls.open(root).config
        # Paths compare resolved: a run made before paths were stored absolute holds them as
        # typed, relative to the working directory (as they are read).
        old_r, new_r = (absolute_paths(c, resolve=True) for c in (old, config))
        # Imported proposals do not depend on the selective-search settings: only the
        # import source matters, and the proposal store checks that itself.
        imported = old_r.data.proposals is not None and old_r.data.proposals == new_r.data.proposals
        diffs = [
            line
            for sec in _CACHE_SECTIONS
            if not (sec == "proposals" and imported)
            for line in _section_diff(old_r, new_r, sec)
        ]
        changed = [line for sec in _STAGE_SECTIONS for line in _section_diff(old_r, new_r, sec)]
        started = [line for line in changed if _stage_started(root, line.split(".")[0])]
        if diffs or started:
            raise CacheMismatchError(
                f"{root} was made with other settings ({'; '.join(diffs + started)}; see "
                f"{path}): use another --out directory"
            )
        if not changed:
            return cls(root, old)
        # the stages that use them have not run: the new settings are taken, and said so
        accepted = _with_sections(old, config, {line.split(".")[0] for line in changed})
        note = f"accepted {time.strftime('%Y-%m-%d %H:%M')}: {'; '.join(changed)}"
        _write_config(root, accepted, note)
        log.warning("%s: %s (their stages have not run yet)", path, note)
        return cls(root, accepted)

    def settle_training_limit(self, split: str, limit: int | None) -> Run:
        """The run as an extraction of ``split`` with ``--limit limit`` leaves it.

        ``data.limit`` (how many images of ``data.train_split`` the training stages use) is set
        by the first extraction of the training split, whichever split created the run: before,
        a run created by a val extraction trained on val. Once the training split's proposals
        are stored, another limit for it is refused rather than silently ignored.
        """
        data = self.config.data
        if split != data.train_split or limit == data.limit:
            return self
        path = self.root / CONFIG_FILE
        if self.path("proposals", f"{split}.npz").exists():
            raise CacheMismatchError(
                f"{self.root} trains on {_first(data.limit)} {split} images (data.limit in "
                f"{path}), not {_first(limit)}: use another --out directory"
            )
        config = dataclasses.replace(self.config, data=dataclasses.replace(data, limit=limit))
        _write_config(self.root, config)
        return Run(self.root, config)

    def settle_training_data(self, split: str, source: DataSource) -> Run:
        """The run as an extraction of ``split`` from ``source`` leaves it: a COCO run learns
        its training file when its training split is extracted (a run created by a val
        extraction knew only the val file, which it does not store); another training file
        than the one it has is refused."""
        d = self.config.data
        if split != d.train_split or not source.is_coco:
            return self
        given = {"coco": source.coco, "images": source.image_dir}
        if d.coco is not None:
            stored = {"coco": d.coco, "images": d.images or str(Path(d.coco).parent)}
            if any(Path(stored[k]).resolve() != Path(v).resolve() for k, v in given.items()):
                raise CacheMismatchError(
                    f"{self.root} trains on {stored['coco']} (images {stored['images']}), not "
                    f"{source.coco} (images {source.image_dir}): use another --out directory"
                )
            return self
        if d.devkit is not None:
            raise CacheMismatchError(f"{self.root} trains on the VOC devkit {d.devkit}, not COCO")
        data = dataclasses.replace(d, **{k: os.path.abspath(v) for k, v in given.items()})
        config = dataclasses.replace(self.config, data=data)
        _write_config(self.root, config)
        return Run(self.root, config)

    def with_finetune(self, **changes: Any) -> Run:
        """The run with ``finetune`` settings changed (``None`` values ignored), written to
        ``config.yaml`` while fine-tuning has not started; afterwards a different value is
        refused (the trained model and every stage after it were made with the old one)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        old = self.config.finetune
        if not changes or all(getattr(old, k) == v for k, v in changes.items()):
            return self
        new = merge(old, changes, "command line")
        started = [p for p in ("model.pt", "checkpoint.pt") if self.path("finetune", p).exists()]
        if started:
            lines = diff(canonical(to_dict(old)), canonical(to_dict(new)), "finetune")
            raise CacheMismatchError(
                f"{self.root} was fine-tuned with other settings ({'; '.join(lines)}; see "
                f"{self.root / CONFIG_FILE}): use another run directory"
            )
        config = dataclasses.replace(self.config, finetune=new)
        _write_config(self.root, config)
        return Run(self.root, config)

    @classmethod
    def open(cls, root: str | Path) -> Run:
        """Open an existing run directory."""
        path = Path(root) / CONFIG_FILE
        if not path.exists():
            raise SppdetError(
                f"{root} is not a run directory (no {CONFIG_FILE}); run extract first"
            )
        return cls(root, stored_run_config(load_yaml(path), str(path)))

    def stored_path(self, section: str, key: str) -> str | None:
        """The path setting ``section.key`` (:data:`~sppdet.run_paths.PATH_SETTINGS`) as
        stored, checked by :func:`~sppdet.run_paths.stored_path` (a relative path of a run made
        before paths were stored absolute must exist from the working directory)."""
        value = getattr(getattr(self.config, section), key)
        if not is_path(section, key, value):
            return value
        return stored_path(value, f"{section}.{key}", self.root / CONFIG_FILE)

    def with_test(self, conv_dtype: str | None = None, **changes: Any) -> Run:
        """The same run with test-time settings changed (not written to disk).

        ``conv_dtype``: run the conv trunk in this dtype (``features.conv_dtype``; ``auto``:
        :func:`~sppdet.fastpath.resolve_conv_dtype` for the run's device). When it differs from
        the run's, maps are computed on the fly: the run's cache holds maps of its own dtype
        (and its manifest would refuse the others).
        """
        if conv_dtype is not None:
            conv_dtype = resolve_conv_dtype(conv_dtype, self.device)
        test = dataclasses.replace(
            self.config.test, **{k: v for k, v in changes.items() if v is not None}
        )
        config = dataclasses.replace(self.config, test=test)
        if conv_dtype is not None and conv_dtype != config.features.conv_dtype:
            features = dataclasses.replace(config.features, conv_dtype=conv_dtype, cache=False)
            config = dataclasses.replace(config, features=features)
        out = Run(self.root, config)
        if config.features == self.config.features:  # same trunk: keep the built extractors
            for key in ("extractor", "tuned_extractor"):
                if key in self.__dict__:
                    out.__dict__[key] = self.__dict__[key]
        return out

    def with_svm(self, **changes: Any) -> Run:
        """The same run with SVM training settings changed for one ``train-svm`` call (not
        written to config.yaml: the SVM stage's manifest records what it was trained with)."""
        svm = dataclasses.replace(self.config.svm, **changes)
        return Run(self.root, dataclasses.replace(self.config, svm=svm))

    def with_bbox(self, **changes: Any) -> Run:
        """The same run with box-regression settings changed for one ``train-bbox`` call (not
        written to config.yaml: the stage's manifest records what it was trained with)."""
        bbox = dataclasses.replace(self.config.bbox, **changes)
        return Run(self.root, dataclasses.replace(self.config, bbox=bbox))

    def with_extractors(self, frozen: FeatureExtractor, tuned: FeatureExtractor) -> Run:
        """The same run with these extractors (e.g. a model file's trunk, see
        :func:`sppdet.model_file.model_run`) instead of ones built from ``features.weights``."""
        out = Run(self.root, self.config)
        out.__dict__["extractor"], out.__dict__["tuned_extractor"] = frozen, tuned
        return out

    @cached_property
    def device(self):
        return resolve_device(self.config.device)

    @cached_property
    def extractor(self) -> FeatureExtractor:
        self.stored_path("features", "weights")
        return FeatureExtractor(self.config.features, self.device)

    def dataset(
        self,
        split: str | None = None,
        *,
        data: DataSource | str | None = None,
        limit: int | None = None,
    ) -> Dataset:
        """The images of ``split`` (default: the training split, ``data.limit`` of them) from
        ``data`` (a :class:`~sppdet.data_source.DataSource`, or a devkit path) or else the
        run's own source (:meth:`data_source`). A COCO split's categories are checked against
        the run's (:func:`~sppdet.data_source.check_categories`)."""
        d = self.config.data
        split = split or d.train_split
        source = self.data_source(split) if data is None else data
        if isinstance(source, str | os.PathLike):
            source = DataSource(devkit=str(source))
        lim = limit if limit is not None else (d.limit if split == d.train_split else None)
        classes = self.stored_path("data", "classes")
        dataset = source.load(split, year=d.year, classes=classes, limit=lim)
        check_categories(self.root, dataset)
        return dataset

    def data_source(self, split: str | None = None) -> DataSource:
        """The run's own source of ``split``: its devkit (every split), or the COCO json of its
        training split (a COCO file is one split: another is given on the command line)."""
        d = self.config.data
        split = split or d.train_split
        if d.coco is not None:
            if split != d.train_split:
                raise ConfigError(
                    f"{self.root} knows the COCO file of its training split ({d.train_split}) "
                    f"only: give the {split} split's as --coco FILE --images DIR"
                )
            coco, images = self.stored_path("data", "coco"), self.stored_path("data", "images")
            return DataSource(coco=coco, images=images)
        devkit = self.stored_path("data", "devkit")
        if devkit is None:
            raise ConfigError("no dataset given: pass --devkit DIR or --coco FILE --images DIR")
        return DataSource(devkit=devkit)

    def proposals(
        self, dataset: Dataset, import_path: str | None = None, *, dist: Dist = SINGLE
    ) -> ProposalSet:
        """Proposals of ``dataset`` (imported from the run's file if one is configured);
        ``dist``: computed by several processes (:mod:`sppdet.distributed`)."""
        path = import_path if import_path is not None else self.stored_path("data", "proposals")
        return ensure_proposals(
            dataset,
            self.config.proposals,
            self.root,
            workers=self.config.workers,
            import_path=path,
            dist=dist,
        )

    @cached_property
    def tuned_extractor(self) -> FeatureExtractor:
        """The extractor with the fine-tuned top conv blocks when fine-tuning trained some
        (``finetune.conv_blocks``), else :attr:`extractor`: what every stage after
        fine-tuning uses (fc SVMs, box regression, detection)."""
        path = self.path("finetune", "model.pt")
        if not path.exists():
            if self.config.finetune.conv_blocks:
                raise SppdetError(
                    f"no fine-tuned model at {path}; run `sppdet finetune {self.root}` first"
                )
            return self.extractor
        state = load_trunk_top(path)
        if state is None:
            return self.extractor
        return self.extractor.with_top(state, "finetuned:sha256:" + file_sha256(path))

    def provider(
        self, dataset: Dataset, *, tuned: bool = False, cache: bool = True, dist: Dist = SINGLE
    ) -> WindowFeatures:
        """Window features of ``dataset``'s split (:func:`~sppdet.window_features.window_features`:
        cached conv maps in SPP mode, warped crops in R-CNN mode).

        ``tuned``: with the fine-tuned top conv blocks (:attr:`tuned_extractor`); the cache
        holds the frozen maps below them either way. ``cache=False``: read and store nothing,
        compute from the pixels (as with ``features.cache: false``, for this split only). A
        cache is checked against the image files of ``dataset``
        (:class:`~sppdet.image_identity.ImageIndex`).
        """
        use_cache = cache and self.config.features.cache
        root = self.root / "features" / dataset.split if use_cache else None
        tuned_ext = self.tuned_extractor if tuned else None
        provider = window_features(self.extractor, self.config.spp, root, tuned=tuned_ext)
        if root is not None:
            index = ImageIndex(root / INDEX_FILE, f"cached {provider.STORED} in {root}")
            index.verify([(r.image_id, r.path) for r in dataset], dist)
        return provider

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def _section_diff(old: RunConfig, new: RunConfig, setting: str) -> list[str]:
    """``diff`` lines of a section (``"svm"``) or of one key (``"data.year"``)."""
    sec, _, key = setting.partition(".")
    a, b = (canonical(to_dict(getattr(c, sec))) for c in (old, new))
    if key:
        a, b = {key: a.get(key)}, {key: b.get(key)}
    return diff(a, b, sec)


def _stage_started(root: Path, section: str) -> bool:
    return any(any(root.glob(g)) for g in _STAGE_OUTPUTS.get(section, ()))


def _with_sections(old: RunConfig, new: RunConfig, sections: set[str]) -> RunConfig:
    """``old`` with ``sections`` taken from ``new`` (``data``: its year and classes only)."""
    changes = {s: getattr(new, s) for s in sections if s != "data"}
    if "data" in sections:
        changes["data"] = dataclasses.replace(
            old.data, year=new.data.year, classes=new.data.classes
        )
    return dataclasses.replace(old, **changes)


def _write_config(root: Path, config: RunConfig, note: str | None = None) -> None:
    """Write ``config.yaml``, keeping its ``# `` note lines (settings accepted later) first."""
    path = root / CONFIG_FILE
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    notes = [line for line in old.splitlines() if line.startswith("# ")]
    notes += [f"# {note}"] if note else []
    atomic_write_text(path, "".join(n + "\n" for n in notes) + _config_text(config))


def _config_text(config: RunConfig) -> str:
    """``config.yaml``'s text: sections and keys in the dataclasses' order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _first(limit: int | None) -> str:
    return "all" if limit is None else f"the first {limit}"
