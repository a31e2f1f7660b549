"""The fine-tuned classifier as fc7 "SVMs": class c's linear score is its logit minus the
background's, ``(w_c - w_0) . fc7 + (b_c - b_0)``. Written as ``RUN/svm_fc7/svm.npz`` of a
variant run (``experiments/variant.py``), so ``sppdet eval --run RUN --ablations`` scores its fc7
rows with the softmax's own linear directions and no SVM training: the SVM-gap study's check of
whether a linear score on fc7 (what an SVM can express) reaches the softmax row, or whether the
softmax's normalisation over classes is what the SVM misses.

    python -m experiments.classifier_svm RUN
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sppdet.svm import LinearSVMs, classifier_prior


def classifier_svms(model_pt: Path) -> LinearSVMs:
    """``LinearSVMs`` (``W [D, K]``, feature scale 1) of logit_c - logit_background."""
    state = torch.load(model_pt, map_location="cpu", weights_only=True)["model"]
    W, b = classifier_prior(state["cls.weight"].numpy(), state["cls.bias"].numpy())
    return LinearSVMs(W=W, b=b, feature_scale=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    args = p.parse_args()
    out = args.run / "svm_fc7"
    out.mkdir(exist_ok=True)
    classifier_svms(args.run / "finetune" / "model.pt").save(out / "svm.npz")
    (out / "stats.json").write_text(json.dumps({"layer": "fc7", "source": "classifier"}) + "\n")
    print(f"wrote {out / 'svm.npz'}")


if __name__ == "__main__":
    main()
