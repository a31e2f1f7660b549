"""``detect`` (a run, a model file or the shipped model on images) and ``export`` (a run to a
model file)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sppdet.detect import SCORERS
from sppdet_cli.fast_options import fast_options, fast_test
from sppdet_cli.pipeline_cmds import MODE, open_run

_DIR = click.Path(exists=True, file_okay=False)
_FILE = click.Path(exists=True, dir_okay=False)


@click.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--run", "run_dir", type=_DIR, help="A trained run directory.")
@click.option(
    "--model",
    type=_FILE,
    help="A model file (`sppdet export`). Without --run and --model: the shipped "
    "models/sppdet_voc07.pt.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(),
    help="Write the detections of the images that could be read as JSON.",
)
@click.option(
    "--out-image",
    type=click.Path(),
    help="Draw the boxes: to this PNG for one image; for several (or into an existing "
    "directory) into this directory as <stem>_det.png, or <stem>_det_<k>.png for the k-th of "
    "images sharing a stem (a/x.png, b/x.jpg: x_det_1.png, x_det_2.png).",
)
@click.option(
    "--score-threshold",
    type=float,
    help="Report detections scoring at least this. Default: 0 for SVM scores (a positive SVM "
    "margin: the SVM calls the window its class; R-CNN's test threshold), 0.5 for softmax "
    "probabilities.",
)
@click.option(
    "--scorer",
    type=click.Choice(SCORERS),
    help="Scores (default: the run's or model's test setting).",
)
@click.option("--device", help="auto | cpu | cuda[:N].")
@MODE
@fast_options
def detect_command(
    images, run_dir, model, json_out, out_image, score_threshold, scorer, device, mode, **kw
):
    """Detect objects in images; print class, score and box per detection, draw and/or save
    them. An image that cannot be read is reported (one line naming it) and skipped; the
    others' detections are still printed and saved, and the command then fails (exit 2)."""
    from sppdet.errors import SppdetError
    from sppdet.predict import detect_images, detector_for

    if run_dir is not None and model is not None:
        raise click.UsageError("give at most one of --run RUN and --model MODEL")
    if run_dir is not None:
        open_run(run_dir, mode)
    elif mode is not None:
        raise click.UsageError("--mode checks a run: it needs --run")
    # conv: the model's or run's own dtype (float32): bf16 cost the shipped model 0.44 mAP
    test = {"scorer": scorer, **fast_test(kw, fc_default="auto")}
    from sppdet_cli.distributed import init_from_env

    dist = init_from_env(device or "auto")  # torchrun: the images are sharded over processes
    detector = detector_for(run_dir, model, device=device, test=test)

    def report(path, exc):
        click.echo(f"error: {exc}", err=True)

    results = detect_images(
        [Path(p) for p in images],
        detector,
        out_image=out_image,
        score_threshold=score_threshold,
        on_error=report,
        dist=dist,
    )
    if not dist.main:
        return
    for res in results:
        click.echo(f"{res['image']}: {len(res['detections'])} detections")
        for d in res["detections"]:
            box = " ".join(f"{v:.1f}" for v in d["box"])
            click.echo(f"  {d['class']:<14s} {d['score']:7.3f}  {box}")
    if json_out:
        from sppdet.storage import atomic_write_text

        atomic_write_text(json_out, json.dumps(results, indent=2) + "\n")
    if len(results) < len(images):  # the unreadable ones (each reported by its rank)
        lost = len(images) - len(results)
        raise SppdetError(f"{lost} of {len(images)} images could not be read (see above)")


@click.command("export")
@click.argument("run_dir", type=_DIR)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32", "int8"]),
    default="float16",
    show_default=True,
    help="Weight matrices' storage (float32: a bit-exact copy of the run; int8: fc6 / fc7 "
    "weights in int8 with a scale per row, the rest float16: about a quarter of float32).",
)
@click.option(
    "--eval",
    "eval_name",
    help="RUN/eval/<NAME>/eval.json whose mAP the file states (default: the run's test "
    "settings evaluated on VOC07 val, if any).",
)
@click.option(
    "--scorer",
    type=click.Choice(["svm", "softmax"]),
    help="The model's default scorer (`detect` without --scorer; default: the run's test "
    "setting). The file holds the SVMs and the softmax layer either way.",
)
def export_command(run_dir, out, dtype, eval_name, scorer):
    """Write a trained run's test path (trunk, fc head, SVMs, box regressors, settings,
    provenance) to one self-contained model file."""
    from sppdet.model_file import export_model

    run = open_run(run_dir)
    if scorer is not None:
        run = run.with_test(scorer=scorer)
    prov = export_model(run, out, dtype=dtype, eval_name=eval_name)
    size = Path(out).stat().st_size / 1e6  # decimal MB, as the 40 MB budget of issue 19
    m = prov["map_voc07_val"]
    stated = "none stated" if m is None else f"{100 * m:.1f}"
    click.echo(f"export: {out} ({size:.1f} MB, {dtype}); VOC07 val mAP: {stated}")


COMMANDS = [detect_command, export_command]
