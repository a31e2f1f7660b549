"""A model file evaluated on VOC07 val against the mAP it states (issue 19's check).

Run the evaluation first, then collect it with the model's own statement::

    sppdet eval --voc2007 --model models/sppdet_voc07.pt --devkit ../shared/data/VOCdevkit \\
        --split val --model-dir runs/model_d17 --fc-dtype int8 --json runs/model_d17_int8.json
    python -m experiments.model_check --model models/sppdet_voc07.pt \\
        --eval runs/model_d17_int8.json --eval-command "sppdet eval ..." \\
        --out results/model_sppdet_voc07_val_int8.json

Prints the stated and measured mAP and their difference; writes both, with the evaluation's
settings, per-class APs and timings, to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sppdet.bench import provenance
from sppdet.model_file import read_model
from sppdet.storage import atomic_write_json, file_sha256, read_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--eval", type=Path, required=True, help="`sppdet eval --model --json` file.")
    p.add_argument("--eval-command", required=True, help="The sppdet eval command that ran.")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model, ev = read_model(args.model, device="cpu"), read_json(args.eval)
    stated = model.provenance.get("map_voc07_val")
    print(f"stated {100 * stated:.2f}  measured {100 * ev['map']:.2f}  "
          f"diff {100 * (ev['map'] - stated):+.2f} points  (fc {ev.get('fc_dtype')})")  # fmt: skip
    record = {
        "what": "a model file evaluated on VOC2007 val with its own test settings",
        "model": str(args.model),
        "model_sha256": file_sha256(args.model),
        "eval_command": args.eval_command,
        "stated_map": stated,
        "stated_from": model.provenance.get("run"),
        "diff_points": 100 * (ev["map"] - stated),
        **ev,
        **provenance(["python", "-m", "experiments.model_check"], commit=ev.get("commit")),
    }
    atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
