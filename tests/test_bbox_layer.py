"""Box regressors on a fine-tuned fc layer (``bbox.layer``, ``train-bbox --layer``): trained on
the head's activations, applied to them at test time, carried by the model file; the tiny
synthetic run of tests/test_cli_e2e.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sppdet.bbox_reg import BBoxRegressor
from sppdet.detect import regress_candidates
from sppdet.model import load_detector
from sppdet.run import Run
from sppdet_cli.main import cli
from tests import test_cli_e2e
from tests.test_cli_e2e import invoke
from tests.test_model_file import detect_json, load_blob, val_images

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run


@pytest.fixture(scope="module")
def fc7_run(trained, tmp_path_factory):
    """The trained run with its box regressors retrained on fc7."""
    run = tmp_path_factory.mktemp("bbfc7") / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    shutil.rmtree(run / "bbox")
    invoke("train-bbox", run, "--layer", "fc7", "--quiet")
    return run


def test_fc7_regressors_are_trained_on_the_heads_activations(trained, fc7_run):
    model = BBoxRegressor.load(fc7_run / "bbox/bbox.npz")
    pool5 = BBoxRegressor.load(trained["run"] / "bbox/bbox.npz")
    hidden = Run.open(fc7_run).config.finetune.hidden
    assert model.layer == "fc7" and pool5.layer == "pool5"
    assert model.weights.shape == (len(trained["classes"]), hidden, 4)
    assert model.weights.shape[1] != pool5.weights.shape[1]
    manifest = json.loads((fc7_run / "bbox/manifest.json").read_text())
    assert manifest["bbox"]["layer"] == "fc7" and manifest["finetune_model"].startswith("sha256:")
    # the default (pool5) stays out of the manifest: stages trained before the key stay valid
    old = json.loads((trained["run"] / "bbox/manifest.json").read_text())
    assert "layer" not in old["bbox"] and "finetune_model" not in old
    # `train` with the run's own setting (pool5) refuses the fc7 stage, naming the key
    res = CliRunner().invoke(cli, ["train-bbox", str(fc7_run), "--quiet"])
    assert res.exit_code != 0 and "layer" in res.output


def test_detection_regresses_from_fc7_and_the_model_file_keeps_it(trained, fc7_run, tmp_path):
    images = val_images(trained, 2)
    by_fc7 = detect_json(tmp_path, *images, "--run", fc7_run, "--fc-dtype", "float32")
    by_pool5 = detect_json(tmp_path, *images, "--run", trained["run"], "--fc-dtype", "float32")
    assert by_fc7 != by_pool5  # the same scores, other boxes
    model = tmp_path / "m.pt"
    invoke("export", fc7_run, "--out", model, "--dtype", "float32")
    assert load_blob(model)["bbox"]["layer"] == "fc7"
    assert detect_json(tmp_path, *images, "--model", model, "--fc-dtype", "float32") == by_fc7


def test_regress_candidates_embeds_the_candidate_rows(fc7_run):
    """The boxes equal the regressors applied by hand to the head's fc7 of each window."""
    run = Run.open(fc7_run)
    det = load_detector(run)
    bbox = det.bbox
    rng = np.random.default_rng(0)
    pool5 = torch.randn(5, bbox_in_dim(run), dtype=torch.float32).abs()
    boxes = np.array(
        [[0, 0, 20, 30], [5, 5, 40, 40], [10, 2, 50, 60], [1, 1, 9, 9], [3, 4, 30, 20]]
    )
    idx, labels = torch.tensor([0, 2, 2, 4]), torch.tensor(rng.integers(0, 2, 4))
    out = regress_candidates(bbox, pool5, None, boxes.astype(np.float32), idx, labels,
                             bbox.feature_scale, det.embed)  # fmt: skip
    fc7 = det.embed(pool5, "fc7") * bbox.feature_scale
    want = bbox.predict(fc7[idx].numpy(), boxes[idx.numpy()], labels.numpy())
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="fine-tuned head"):
        regress_candidates(bbox, pool5, None, boxes, idx, labels, 1.0)


def bbox_in_dim(run: Run) -> int:
    return load_detector(run).trained_head.in_dim


def test_files_without_a_layer_are_pool5_regressors(trained, tmp_path):
    """bbox.npz files and model files written before the layer was stored read as pool5."""
    model = BBoxRegressor.load(trained["run"] / "bbox/bbox.npz")
    with np.load(trained["run"] / "bbox/bbox.npz") as z:
        old = {k: z[k] for k in z.files if k != "layer"}
    np.savez(tmp_path / "old.npz", **old)
    back = BBoxRegressor.load(tmp_path / "old.npz")
    assert back.layer == "pool5"
    np.testing.assert_array_equal(back.weights, model.weights)
    from sppdet.packing import pack_bbox, unpack_bbox

    packed = pack_bbox(model, False, False)
    del packed["layer"]
    assert unpack_bbox(packed).layer == "pool5"
