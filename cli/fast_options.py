"""Test-time speed options: those of ``detect`` / ``eval`` and the measurement-only ones of
``bench`` (issue 7)."""

from __future__ import annotations

import click

from sppdet.fastpath import CONV_DTYPES, FC_DTYPES

#: fc settings the measurements kept (docs/fast_path.md): int8 lost no mAP and is the CPU
#: default; truncated SVD (-4.8 to -15.6 mAP points) and bf16 autocast (slower on this CPU)
#: were rejected, so only ``sppdet bench`` offers them.
TEST_FC_DTYPES = ("auto", "float32", "int8")

_CONV = click.option(
    "--conv-dtype",
    type=click.Choice(("auto", *CONV_DTYPES)),
    help="Conv trunk autocast dtype (maps computed on the fly if not the run's); auto: "
    "bfloat16 on a CPU with AVX512-BF16/AMX, else float32. Default: auto for bench; the "
    "run's or model's (float32; cached maps for eval) for detect and eval.",
)
_DEDUP = click.option("--no-dedup", is_flag=True, help="Pool windows sharing map cells separately.")
_THREADS = click.option("--threads", type=click.IntRange(min=1), help="torch / numba threads.")

_TEST_OPTIONS = [
    click.option(
        "--fc-dtype",
        type=click.Choice(TEST_FC_DTYPES),
        help="fc6/fc7 arithmetic: auto (int8 on a CPU with int8 dot-product instructions, "
        "AVX512-VNNI / AVX-VNNI / AMX; float32 elsewhere: without them int8 is about 100x "
        "slower), float32 or int8. Default: auto for detect, the run's or model's for eval.",
    ),
    _CONV,
    _DEDUP,
    _THREADS,
]
_BENCH_OPTIONS = [
    click.option("--svd-fc6", type=click.IntRange(min=0), help="Rank of fc6's truncated SVD."),
    click.option("--svd-fc7", type=click.IntRange(min=0), help="Rank of fc7's truncated SVD."),
    click.option("--fc-dtype", type=click.Choice(FC_DTYPES), help="fc stage dtype / autocast."),
    _CONV,
    _DEDUP,
    _THREADS,
]


def fast_options(func):
    """Decorate ``detect`` / ``eval`` with the speed options kept for the test path."""
    for option in reversed(_TEST_OPTIONS):
        func = option(func)
    return func


def bench_options(func):
    """Decorate ``bench`` with every speed option, the rejected ones included (to measure)."""
    for option in reversed(_BENCH_OPTIONS):
        func = option(func)
    return func


def fast_test(kwargs: dict, conv_default: str | None = None, fc_default: str | None = None) -> dict:
    """Pop the speed options from a command's ``kwargs``; set threads; return test overrides.

    ``fc_default``: ``--fc-dtype`` when not given; ``detect`` passes ``"auto"`` (int8 fc on a
    CPU: the shipped model's VOC07 val mAP within 0.1 points of float32, docs/results.md), while
    ``eval`` keeps the run's or model's setting (None). ``conv_default``: ``--conv-dtype`` when
    not given. ``bench`` passes ``"auto"`` (bf16 on CPUs with native bf16: within 0.3 mAP
    points of float32 with the MobileNetV2 ``features[13]`` run); ``detect`` and ``eval`` keep
    the run's or model's conv dtype (None): bf16 convs cost the shipped EfficientNet-Lite0 model
    0.44 mAP points on VOC07 val (docs/fast_path.md), for 0.025 s per image.
    """
    threads = kwargs.pop("threads", None)
    if threads is not None:
        from sppdet.device import set_threads

        set_threads(threads)
    out = {
        "svd_fc6": kwargs.pop("svd_fc6", None),
        "svd_fc7": kwargs.pop("svd_fc7", None),
        "fc_dtype": kwargs.pop("fc_dtype", None) or fc_default,
        # Run.with_test: features.conv_dtype
        "conv_dtype": kwargs.pop("conv_dtype", None) or conv_default,
        "dedup": False if kwargs.pop("no_dedup", False) else None,
    }
    return {k: v for k, v in out.items() if v is not None}
