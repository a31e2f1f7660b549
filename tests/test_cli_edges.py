"""The command line's edges (issue 20, "nothing silently wrong"): detect on several images when
some cannot be read, drawings of images sharing a name, eval of a directory without comp4 files,
and runs used from another working directory. A tiny synthetic run as in test_cli_e2e."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from PIL import Image

from sppdet.predict import drawing_names
from sppdet_cli.main import cli
from tests.test_cli_e2e import CONFIG, invoke


def run_cli(*args: str | Path) -> Result:
    """``sppdet ARGS`` in-process, whatever its exit code."""
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A run made with relative paths from one directory, then trained from another."""
    root = tmp_path_factory.mktemp("edges")
    (root / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        Path("cfg.yaml").write_text(CONFIG)
        invoke("make-synthetic", "data", "--images", 8, "--size", "96x96", "--seed", 0)
        invoke("extract", "--devkit", "data", "--split", "train", "--out", "run",
               "--config", "cfg.yaml")  # fmt: skip
        mp.chdir(root / "elsewhere")
        invoke("train", root / "run", "--quiet")  # reads the devkit: stored absolute
    val = (root / "data/VOC2007/ImageSets/Main/val.txt").read_text().split()
    images = [root / "data/VOC2007/JPEGImages" / f"{i}.jpg" for i in val]
    return {"root": root, "data": root / "data", "run": root / "run", "images": images}


def test_a_run_stores_absolute_paths_and_trains_from_elsewhere(trained):
    stored = yaml.safe_load((trained["run"] / "config.yaml").read_text())
    assert stored["data"]["devkit"] == str(trained["data"])
    assert (trained["run"] / "svm_fc7" / "svm.npz").is_file()  # the fixture trained it


def test_detect_reports_each_unreadable_image_and_keeps_the_others(trained, tmp_path):
    good1, good2 = trained["images"][:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    missing, folder = tmp_path / "missing.jpg", tmp_path / "folder.jpg"
    folder.mkdir()
    out_dir, out_json = tmp_path / "drawn", tmp_path / "dets.json"
    res = run_cli(
        "detect", good1, missing, folder, bad, good2, "--run", trained["run"],
        "--score-threshold", -5, "--json", out_json, "--out-image", out_dir,
    )  # fmt: skip
    assert res.exit_code == 2
    errors = res.stderr.splitlines()
    assert errors == [
        f"error: image not found: {missing}",
        f"error: image {folder} is a directory",
        errors[2],
        "error: 3 of 5 images could not be read (see above)",
    ]
    assert errors[2].startswith(f"error: cannot read image {bad}: ")
    assert f"{good1}: " in res.stdout and f"{good2}: " in res.stdout
    saved = json.loads(out_json.read_text())
    assert [r["image"] for r in saved] == [str(good1), str(good2)]
    assert all(r["detections"] for r in saved)  # a threshold of -5 keeps every detection
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{p.stem}_det.png" for p in (good1, good2)
    )


def test_detect_drawings_of_images_sharing_a_stem_do_not_collide(trained, tmp_path):
    first, second, third = trained["images"][:3]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(first, tmp_path / "a" / "x.jpg")
    with Image.open(second) as im:  # another size, to tell the drawings apart
        im.resize((120, 96)).save(tmp_path / "b" / "x.png")
    images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png", third]
    out_dir, out_json = tmp_path / "drawn", tmp_path / "dets.json"
    invoke("detect", *images, "--run", trained["run"], "--json", out_json, "--out-image", out_dir)
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(["x_det_1.png", "x_det_2.png", f"{third.stem}_det.png"])
    for name, size in (("x_det_1.png", (96, 96)), ("x_det_2.png", (120, 96))):
        with Image.open(out_dir / name) as im:
            assert im.size == size, name
    # the JSON is one file: its entries name each image as given
    assert [r["image"] for r in json.loads(out_json.read_text())] == [str(p) for p in images]
    assert "<stem>_det_<k>.png" in invoke("detect", "-h").output


def test_drawing_names_are_unique_and_deterministic():
    paths = ["a/x.png", "b/X.jpg", "c/y.jpg", "d/x_det_1.png", "c/y.jpg", "z.png"]
    names = drawing_names(paths)
    assert names == [
        "x_det_1.png", "X_det_2.png", "y_det_1.png", "x_det_1_det.png", "y_det_2.png",
        "z_det.png",
    ]  # fmt: skip
    assert len({n.casefold() for n in names}) == len(names)  # also on case-insensitive disks
    assert drawing_names(paths) == names


def test_eval_of_a_directory_without_comp4_files_of_the_split_is_an_error(trained, tmp_path):
    args = ("eval", "--voc2007", "--devkit", trained["data"], "--split", "val", "--detections")
    res = run_cli(*args, tmp_path)
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [
        f"error: {tmp_path} has no comp4_det_val_<class>.txt file for any of the 4 classes "
        "(e.g. comp4_det_val_disc.txt): it holds no comp4 files"
    ]
    (tmp_path / "comp4_det_test_disc.txt").write_text("")
    res = run_cli(*args, tmp_path)
    assert res.exit_code == 2 and "comp4 files are for split(s) test" in res.stderr
    (tmp_path / "comp4_det_val_disc.txt").write_text("")  # one class: the others have none
    res = run_cli(*args, tmp_path)
    assert res.exit_code == 0 and "mAP" in res.stdout


def test_a_run_made_with_relative_paths_before_keeps_working_from_there(
    trained, tmp_path, monkeypatch
):
    """A run made before paths were stored absolute (config.yaml as typed): reopened with the
    same settings typed absolute it is not refused; from elsewhere it is a one-line error."""
    import sppdet.run

    root = trained["root"]
    monkeypatch.chdir(root)
    legacy = tmp_path / "legacy"
    args = ("extract", "--split", "train", "--out", legacy, "--config", "cfg.yaml", "--limit", 2)
    with monkeypatch.context() as mp:  # as before: paths stored as typed
        mp.setattr(sppdet.run, "absolute_paths", lambda c, resolve=False: c)
        invoke(*args, "--devkit", "data")
    text = (legacy / "config.yaml").read_text()
    assert yaml.safe_load(text)["data"]["devkit"] == "data"
    again = invoke(*args, "--devkit", root / "data")
    assert "0 maps computed" in again.output
    assert (legacy / "config.yaml").read_text() == text
    monkeypatch.chdir(root / "elsewhere")
    res = run_cli("train", legacy, "--quiet")
    assert res.exit_code == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"error: {legacy / 'config.yaml'}: data.devkit 'data' is relative")
    assert "run sppdet from that directory" in line


def test_detect_reads_a_phone_photo_upright(trained, tmp_path):
    """A photo stored sideways with an EXIF "rotate 90 CW" tag is detected as its upright twin
    (the same pixels stored turned): the same detections, boxes in the upright frame."""

    with Image.open(trained["images"][0]) as im:
        upright = np.asarray(im.convert("RGB").resize((96, 120)))
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns the stored pixels 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
        tmp_path / "phone.png", exif=exif
    )
    out = tmp_path / "dets.json"
    args = ("--run", trained["run"], "--score-threshold", -5, "--json", out)
    invoke("detect", tmp_path / "upright.png", tmp_path / "phone.png", *args)
    twin, phone = json.loads(out.read_text())
    assert phone["detections"] == twin["detections"] and phone["detections"]
    assert max(d["box"][2] for d in phone["detections"]) <= 96  # 96 wide, 120 high
    assert max(d["box"][3] for d in phone["detections"]) > 96


@pytest.mark.parametrize(
    ("options", "yaml_text", "message"),
    [
        (["--scales", "0"], "", "features.scales"),
        (["--scales", "-688"], "", "features.scales"),
        (["--max-size", "0"], "", "features.max_size"),
        (["--workers", "0"], "", "workers must be >= 1"),
        (["--limit", "0"], "", "data.limit"),
        ([], "features:\n  backbone: mobilnet_v2\n", "unknown backbone 'mobilnet_v2'"),
        ([], "features:\n  weights: no/such/file.pth\n", "features.weights"),
    ],
)
def test_bad_settings_stop_extract_before_anything_is_written(
    trained, tmp_path, options, yaml_text, message
):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_merged(CONFIG, yaml_text)))
    out = tmp_path / "run"
    res = run_cli("extract", "--devkit", trained["root"] / "data", "--split", "train",
                  "--out", out, "--config", cfg, *options)  # fmt: skip
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
    assert not out.exists()  # no run directory, so the corrected command is not refused


def _merged(base: str, delta: str) -> dict:
    out = yaml.safe_load(base)
    for section, values in (yaml.safe_load(delta) or {}).items():
        out.setdefault(section, {}).update(values)
    return out


def test_extract_without_weights_warns_that_the_trunk_is_random(trained, tmp_path):
    # A random trunk is what tests and the demo ask for (`weights: random`); left unset on real
    # images it would detect nothing without a word, so extract says so (once, on stderr).
    quiet = tmp_path / "random.yaml"
    quiet.write_text(CONFIG)
    settings = yaml.safe_load(CONFIG)
    del settings["features"]["weights"]
    unset = tmp_path / "unset.yaml"
    unset.write_text(yaml.safe_dump(settings))
    data = trained["root"] / "data"
    for cfg, warned in ((quiet, False), (unset, True)):
        res = run_cli("extract", "--devkit", data, "--split", "train", "--limit", 1,
                      "--out", tmp_path / cfg.stem, "--config", cfg)  # fmt: skip
        assert res.exit_code == 0, res.output
        assert ("randomly initialised" in res.stderr) is warned
        assert "randomly initialised" not in res.stdout
