"""The list of sppdet commands, in the order ``sppdet --help`` shows them."""

from __future__ import annotations

from sppdet_cli.bench_cmd import command as bench_command
from sppdet_cli.convert_cmd import command as convert_command
from sppdet_cli.data_cmd import command as make_synthetic
from sppdet_cli.eval_cmd import command as eval_command
from sppdet_cli.model_cmds import COMMANDS as MODEL
from sppdet_cli.pipeline_cmds import COMMANDS as PIPELINE
from sppdet_cli.proposals_cmd import command as proposals_command

ALL: list = [
    make_synthetic,
    convert_command,
    proposals_command,
    *PIPELINE,
    *MODEL,
    eval_command,
    bench_command,
]
