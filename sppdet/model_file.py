"""A self-contained model file: everything the test path needs, exported from a trained run.

``sppdet export RUN --out MODEL`` writes one gzip-compressed ``torch.save`` file (read back with
``weights_only=True``: tensors, numbers, strings, lists and dicts only; gzip takes about 10 %
off int8 weights, which brings the VOC model under 40 MB) holding

* ``format`` / ``version``: :data:`FORMAT` and :data:`VERSION`, checked on load;
* ``config``: the run's ``features`` (backbone name, scales, max_size, top_blocks, ...),
  ``spp``, ``proposals`` and ``test`` sections, and ``finetune.conv_blocks``;
* ``classes`` and ``preprocessing`` (the backbone's mean / std, the tapped layer, scales and
  max_size: informational, the backbone spec is what normalises);
* ``trunk``: the tapped trunk's state_dict as the run used it (its ImageNet or random weights)
  and ``trunk_top``: the fine-tuned top blocks (conv fine-tuning), or None;
* ``head`` (fc6 / fc7 / classifier + input standardisation), ``svms`` per layer and ``bbox``
  (box regressors with their feature scale);
* ``provenance``: training data, commit, the run directory, VOC07 val mAP from an
  ``RUN/eval/*/eval.json`` when there is one (else null).

Weight matrices (floating tensors of at least :data:`sppdet.packing.HALF_MIN_NUMEL` elements)
are stored in float16 by default; biases, batch-norm statistics and standardisation vectors
stay float32. ``dtype="int8"`` stores the head's fc6 / fc7 weights (about 85 % of a VOC model;
the symmetric per-channel rounding of :class:`sppdet.fastpath.Int8Linear`, which a CPU
detector with int8 instructions applies at test time anyway) and the box regressors' weights as
int8 with one float32 scale per output channel; the trunk stays float16 (:mod:`sppdet.packing`).
On load everything is float32 again. tests/test_model_file.py measures what float16 and int8
change; docs/results.md what the shipped int8 file scores against its run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import io
import logging
from pathlib import Path
from typing import Any

import torch

from sppdet.backbones import backbone_spec, build_backbone
from sppdet.bbox_reg import BBoxRegressor
from sppdet.configutil import merge, to_dict
from sppdet.data_source import DataSource
from sppdet.detect import TestConfig
from sppdet.device import resolve_device
from sppdet.errors import SppdetError
from sppdet.features import FeatureConfig, FeatureExtractor, SPPConfig
from sppdet.head import FCHead, head_from_state
from sppdet.model import head_path, load_bbox, load_svms, run_classes, trained_parts
from sppdet.packing import half as to_half
from sppdet.packing import pack_bbox, pack_head, pack_state, unpack_bbox, unpack_head, unpack_state
from sppdet.proposals import ProposalConfig
from sppdet.run import DataConfig, Run, RunConfig
from sppdet.storage import atomic_write_bytes, git_commit, read_json
from sppdet.svm import LinearSVMs

log = logging.getLogger(__name__)

FORMAT = "sppdet-model"
#: Bumped whenever a reader of the previous version would misread a file (version 2: gzip, and
#: int8 head weights, which a version-1 reader would take for float values; version 3: int8
#: box-regressor weights as an ``{"int8", "scale"}`` dict, see :mod:`sppdet.packing`).
VERSION = 3
#: The first bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"
#: Versions this reader reads.
READABLE_VERSIONS = (1, 2, 3)
#: Export dtypes: how the weight matrices are stored.
EXPORT_DTYPES = ("float16", "float32", "int8")
#: Where the default model ships (``sppdet detect`` without ``--run`` / ``--model``).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "sppdet_voc07.pt"


# ------------------------------------------------------------------------------- export


def _pack_svms(s: LinearSVMs, half: bool) -> dict:
    """One layer's SVMs as tensors (the weights in float16 with ``half``); with
    ``svm.prior: softmax`` also the classifier they adapt and their weights of it."""
    out = {
        "W": to_half(torch.from_numpy(s.W), half),
        "b": torch.from_numpy(s.b),
        "feature_scale": float(s.feature_scale),
    }
    if s.has_prior:
        out["prior_W"] = to_half(torch.from_numpy(s.prior_W), half)
        out.update(prior_b=torch.from_numpy(s.prior_b), prior_a=torch.from_numpy(s.prior_a))
    return out


def export_model(
    run: Run, out: str | Path, *, dtype: str = "float16", eval_name: str | None = None
) -> dict:
    """Write ``run``'s trained parts and settings to the model file ``out``.

    Args:
        dtype: ``float16`` (weight matrices halved), ``int8`` (float16, and fc6 / fc7 in int8:
            a quarter) or ``float32`` (bit-exact copy).
        eval_name: the ``RUN/eval/<name>/eval.json`` whose mAP goes into the provenance
            (default: the VOC07 val evaluation of the run's test settings, if any).

    Returns:
        The provenance written.
    """
    if dtype not in EXPORT_DTYPES:
        raise SppdetError(f"unknown export dtype {dtype!r}; expected one of {EXPORT_DTYPES}")
    have = trained_parts(run)
    if not have:
        raise SppdetError(f"nothing trained in {run.root}; run `sppdet train {run.root}`")
    if run.config.features.mode != "spp":
        raise SppdetError("only SPP-mode runs can be exported (R-CNN mode is the baseline)")
    half, int8 = dtype != "float32", dtype == "int8"
    c = run.config
    spec = backbone_spec(c.features.backbone)
    trunk = build_backbone(c.features.backbone, c.features.weights, seed=c.features.seed)
    head = None
    if "head" in have:  # the head file also holds the fine-tuned top blocks (conv fine-tuning)
        head = torch.load(head_path(run), map_location="cpu", weights_only=True)
    top = head.get("trunk_top") if head is not None else None
    bbox = load_bbox(run) if "bbox" in have else None
    svms = {la: load_svms(run, la) for la in ("pool5", "fc6", "fc7") if f"svm_{la}" in have}
    provenance = _provenance(run, eval_name)
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "config": {
            "features": to_dict(c.features),
            "spp": to_dict(c.spp),
            "proposals": to_dict(c.proposals),
            "test": to_dict(c.test),
            "conv_blocks": c.finetune.conv_blocks,
        },
        "classes": list(run_classes(run)),
        "preprocessing": {
            "mean": list(spec.mean),
            "std": list(spec.std),
            "tap": spec.tap,
            "scales": list(c.features.scales),
            "max_size": c.features.max_size,
        },
        "trunk": pack_state(trunk.state_dict(), half),
        "trunk_top": pack_state(top, half) if top is not None else None,
        "head": None if head is None else pack_head(head, half, int8),
        "svms": {la: _pack_svms(s, half) for la, s in svms.items()},
        "bbox": None if bbox is None else pack_bbox(bbox, half, int8),
        "provenance": provenance,
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    # mtime=0: the same run exports to the same bytes
    atomic_write_bytes(out, gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
    return provenance


def _provenance(run: Run, eval_name: str | None) -> dict:
    d = run.config.data
    ev = _voc07_val_eval(run, eval_name)
    return {
        "training_data": {
            "devkit": d.devkit,
            "coco": d.coco,
            "images": d.images,
            "year": d.year,
            "split": d.train_split,
            "limit": d.limit,
            "proposals": d.proposals,
        },
        "run": str(run.root),
        "commit": ev.get("commit") if ev else git_commit(),
        "exported_with_commit": git_commit(),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "map_voc07_val": ev["map"] if ev else None,
        "eval": {k: ev.get(k) for k in ("variant", "images", "split", "commit")} if ev else None,
    }


def _voc07_val_eval(run: Run, name: str | None) -> dict | None:
    """The eval.json of ``name``, or of the run's test settings on ``val`` (the largest)."""
    if name is not None:
        path = run.path("eval", name, "eval.json")
        if not path.exists():
            raise SppdetError(f"no evaluation {path}")
        return read_json(path)
    if run.config.data.year != "2007":
        return None
    t = run.config.test
    found = []
    for path in sorted(run.path("eval").glob("*/eval.json")):
        ev = read_json(path)
        same = (ev.get("scorer"), ev.get("layer"), ev.get("bbox_reg")) == (
            t.scorer,
            t.layer,
            t.bbox_reg,
        )
        if ev.get("split") == "val" and same and ev.get("map") is not None:
            found.append(ev)
    return max(found, key=lambda ev: ev.get("images", 0)) if found else None


# --------------------------------------------------------------------------------- load


@dataclasses.dataclass
class ModelFile:
    """A loaded model file: the same parts interface as :class:`sppdet.model.RunParts`, so
    :func:`sppdet.model.load_detector` builds detectors from either."""

    path: Path
    device: torch.device
    features: FeatureConfig
    spp: SPPConfig
    proposals: ProposalConfig
    test: TestConfig
    conv_blocks: int
    class_names: tuple[str, ...]
    provenance: dict
    blob: dict = dataclasses.field(repr=False)

    @property
    def extractor(self) -> FeatureExtractor:
        if "_extractor" not in self.__dict__:
            trunk = unpack_state(self.blob["trunk"])
            ext = FeatureExtractor(self.features, self.device, trunk_state=trunk)
            ext.trunk_id = f"model:{self.path.name}"
            self.__dict__["_extractor"] = ext
        return self.__dict__["_extractor"]

    @property
    def tuned_extractor(self) -> FeatureExtractor:
        top = self.blob["trunk_top"]
        if top is None:
            return self.extractor
        if "_tuned" not in self.__dict__:
            state = unpack_state(top)
            self.__dict__["_tuned"] = self.extractor.with_top(state, f"{self.path.name}:tuned")
        return self.__dict__["_tuned"]

    def with_features(self, **changes: Any) -> ModelFile:
        """The same model with feature settings changed (e.g. other scales, the conv dtype)."""
        features = dataclasses.replace(self.features, **changes)
        return dataclasses.replace(self, features=features)

    def classes(self) -> tuple[str, ...]:
        return self.class_names

    def have(self) -> set[str]:
        b = self.blob
        out = {f"svm_{la}" for la in b["svms"]}
        return out | {k for k in ("head", "bbox") if b[k] is not None}

    def head(self) -> FCHead | None:
        h = self.blob["head"]
        if h is None:
            return None
        return head_from_state(h["config"], unpack_head(h), self.device)

    def require_head(self) -> FCHead:
        head = self.head()
        if head is None:
            raise SppdetError(f"model file {self.path} has no fine-tuned head")
        return head

    def svms(self, layer: str) -> LinearSVMs:
        s = self.blob["svms"].get(layer)
        if s is None:
            raise SppdetError(f"model file {self.path} has no {layer} SVMs")
        prior = {k: s[k].float().numpy() for k in LinearSVMs.PRIOR_FIELDS if k in s}
        return LinearSVMs(
            W=s["W"].float().numpy(),
            b=s["b"].float().numpy(),
            feature_scale=s["feature_scale"],
            **prior,
        )

    def bbox(self) -> BBoxRegressor:
        b = self.blob["bbox"]
        if b is None:
            raise SppdetError(f"model file {self.path} has no box regressors")
        return unpack_bbox(b)


def with_test(run: Run, source: ModelFile | None, test: dict) -> tuple[Run, ModelFile | None]:
    """``run.with_test(**test)``, and the model file (if the parts come from one) with the
    same test settings and, when ``conv_dtype`` changed the features, its trunk in it."""
    run = run.with_test(**test)
    if source is not None:
        source = dataclasses.replace(source, test=run.config.test)
        if run.config.features != source.features:
            source = source.with_features(conv_dtype=run.config.features.conv_dtype)
            run = run.with_extractors(source.extractor, source.tuned_extractor)
    return run, source


def read_model(path: str | Path, device: str = "auto") -> ModelFile:
    """Load a model file written by :func:`export_model` (checks its format and version)."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"no model file {path}")
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:  # version 1 files are plain torch.save files
            data = gzip.decompress(data)
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types for arbitrary bytes
        raise SppdetError(
            f"{path} is not an sppdet model file (`sppdet export` writes one)"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SppdetError(f"{path} is not an sppdet model file (no {FORMAT!r} format tag)")
    if blob.get("version") not in READABLE_VERSIONS:
        raise SppdetError(
            f"{path} is an sppdet model file of format version {blob.get('version')}; this "
            f"sppdet reads versions {', '.join(map(str, READABLE_VERSIONS))}: re-export it "
            "from its run with `sppdet export`"
        )
    c = blob["config"]
    features = merge(FeatureConfig(), {**c["features"], "weights": None, "cache": False})
    return ModelFile(
        path=path,
        device=resolve_device(device),
        features=features,
        spp=merge(SPPConfig(), c["spp"]),
        proposals=merge(ProposalConfig(), c["proposals"]),
        test=merge(TestConfig(), c["test"]),
        conv_blocks=int(c["conv_blocks"]),
        class_names=tuple(blob["classes"]),
        provenance=blob["provenance"],
        blob=blob,
    )


def model_run(model: ModelFile, root: str | Path, *, data: DataSource | str | Path) -> Run:
    """A run directory for evaluating ``model`` on a dataset (``sppdet eval --model``): its
    proposals, eval outputs and config live in ``root``; its extractors are the model's.
    ``data``: a devkit path or a :class:`~sppdet.data_source.DataSource` (a COCO one is not
    stored: the commands give it to each stage, as they give a run another split's). The
    proposals are imported from the file the model was trained with when it is here (e.g. a
    VOC07 trainval import), else computed with the model's proposal settings."""
    imported = model.provenance.get("training_data", {}).get("proposals")
    if imported is not None and not Path(imported).is_file():
        imported = None
    if isinstance(data, DataSource) and data.is_coco:
        imported = None  # a VOC proposal file has none of a COCO file's images
    config = RunConfig(
        data=DataConfig(devkit=_devkit(data), proposals=imported),
        proposals=model.proposals,
        features=model.features,
        spp=model.spp,
        test=model.test,
        device=str(model.device),
    )
    run = Run.create(root, config)
    run = Run(run.root, dataclasses.replace(run.config, test=model.test))
    return run.with_extractors(model.extractor, model.tuned_extractor)


def _devkit(data: DataSource | str | Path) -> str | None:
    if isinstance(data, DataSource):
        return data.devkit
    return str(data)


def default_model_path() -> Path:
    """The shipped model, or a one-line error when none ships yet."""
    if not DEFAULT_MODEL.is_file():
        raise SppdetError(
            f"no model ships yet ({DEFAULT_MODEL} is absent): train a run and make one with "
            "`sppdet export RUN --out MODEL`, then pass --model MODEL (or --run RUN)"
        )
    return DEFAULT_MODEL
