"""Tests of the generated results tables (experiments.results_table): recipes side by side."""

from __future__ import annotations

from experiments.results_table import BASELINE_RECIPE, details, table


def _result(variant: str, m: float, scales=(688,), recipe: str | None = None) -> dict:
    r = {
        "variant": variant,
        "map": m,
        "scales": list(scales),
        "test_seconds_per_image": {"fc": 0.25, "spp": 0.05},
        "commit": "0123456789abcdef",
    }
    return r if recipe is None else {**r, "recipe": recipe}


def test_recipes_side_by_side_with_the_gain_and_the_paper():
    results = [
        _result("fc7_bb", 0.405),
        _result("pool5", 0.307),
        _result("fc7_bb", 0.471, recipe="mnv2_d17_frozen"),
        _result("softmax", 0.5, scales=(480, 576, 688, 864, 1200), recipe="mnv2_d17_frozen"),
    ]
    lines = table(results).splitlines()
    assert "features[13]" in lines[0] and "features[17]" in lines[0] and "gain" in lines[0]
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    fc7_bb = rows["SVM on fine-tuned fc7 + bbox regression"]
    assert fc7_bb == "| 1 | SVM on fine-tuned fc7 + bbox regression | 40.5 | 47.1 | +6.6 | 58.0 |"
    assert rows["SVM on pool5 (SPP vector), no fine-tuning"].endswith("| 30.7 |  |  | 43.0 |")
    assert lines[-1].startswith("| 5 | fine-tuned softmax")  # 1 scale first, then 5
    every = details(results).splitlines()[2:]
    assert [r.split(" | ")[0] for r in every] == [f"| {BASELINE_RECIPE}"] * 2 + [
        "| mnv2_d17_frozen"
    ] * 2
