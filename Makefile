# Every target creates/refreshes the local .venv itself, so a fresh clone needs nothing installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: venv test lint format demo bench fast-path voc07 voc07-1scale voc07-5scale voc07-d17-1scale voc07-lite0-1scale voc07-d17-5scale voc07-lite0-5scale voc07-lite0-dedup-1scale voc07-lite0-dedup-5scale tap-study repro-1scale repro-5scale repro-d17-1scale repro-d17-5scale repro-lite0-1scale repro-lite0-dedup-1scale clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned in pyproject.toml; pip takes them from this machine's disk.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format --check sppdet cli tests scripts experiments
	$(BIN)/ruff check sppdet cli tests scripts experiments

format: $(STAMP)
	$(BIN)/ruff format sppdet cli tests scripts experiments
	$(BIN)/ruff check --fix sppdet cli tests scripts experiments

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_DIR)

bench: $(STAMP)
	bash scripts/bench.sh

# mAP cost and speed of each test-time speed setting on VOC07 val (needs make voc07-1scale first).
fast-path: $(STAMP)
	$(BIN)/python scripts/fast_path.py --run runs/voc07_1s --devkit ../shared/data/VOCdevkit --split val --name fast_path_voc07_val

clean:
	rm -rf $(VENV) runs/demo .pytest_cache

# VOC2007 train -> val with the real data in ../shared (hours on 2 CPU cores; resumable:
# rerun the same target to finish an interrupted run). Writes results/*.json; the tables of
# docs/results.md are regenerated from them with `python -m experiments.results_table`.
voc07: voc07-1scale voc07-5scale

voc07-1scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_mnv2_1scale.yaml --run runs/voc07_1s --name voc07_mnv2_1scale

voc07-5scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_mnv2_5scale.yaml --run runs/voc07_5s --name voc07_mnv2_5scale

# The recipe chosen by the tap study (issue 17): MobileNetV2 up to features[17], dilated to stride 16.
voc07-d17-1scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_d17_1scale.yaml --run runs/voc07_d17_1s --name voc07_d17_1scale --recipe mnv2_d17_frozen --pool5-retrain-growth 0.5

# EfficientNet-Lite0 dilated (issue 17's other backbone), 1 scale; about 6 h on 2 cores, resumable.
voc07-lite0-1scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_lite0_1scale.yaml --run runs/voc07_lite0_1s --name voc07_lite0_1scale --recipe lite0_d_frozen --no-pool5

voc07-d17-5scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_d17_5scale.yaml --run runs/voc07_d17_5s --name voc07_d17_5scale --recipe mnv2_d17_frozen --val-maps compute --no-pool5

# Its 5-scale run: the train split's maps are cached (~28 GB), the val maps computed in eval.
voc07-lite0-5scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_lite0_5scale.yaml --run runs/voc07_lite0_5s --name voc07_lite0_5scale --recipe lite0_d_frozen --val-maps compute --no-pool5

# The default recipe: the Lite0 one with the paper's negative deduplication in SVM mining.
voc07-lite0-dedup-1scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_lite0_dedup_1scale.yaml --run runs/voc07_lite0_dedup_1s --name voc07_lite0_dedup_1scale --recipe lite0_d_dedup --no-pool5

voc07-lite0-dedup-5scale: $(STAMP)
	$(BIN)/python -m experiments.voc07 --config configs/voc07_lite0_dedup_5scale.yaml --run runs/voc07_lite0_dedup_5s --name voc07_lite0_dedup_5scale --recipe lite0_d_dedup --val-maps compute --no-pool5

# 300 -> 300 comparison of SPP taps with and without conv fine-tuning: results/tap_study_voc300.json.
tap-study: $(STAMP)
	bash experiments/tap_study.sh runs/tap

# Rerun the committed experiment on a clean clone of HEAD (beside this checkout, see
# experiments/repro.sh) and compare its mAP with results/*.json: results/reproductions/<name>.json.
repro-1scale: $(STAMP)
	bash experiments/repro.sh voc07_mnv2_1scale voc07-1scale

repro-5scale: $(STAMP)
	bash experiments/repro.sh voc07_mnv2_5scale voc07-5scale

# The same check for the d17 recipe (issue 17's successor of repro-1scale).
repro-d17-1scale: $(STAMP)
	bash experiments/repro.sh voc07_d17_1scale voc07-d17-1scale

repro-d17-5scale: $(STAMP)
	bash experiments/repro.sh voc07_d17_5scale voc07-d17-5scale

repro-lite0-1scale: $(STAMP)
	bash experiments/repro.sh voc07_lite0_1scale voc07-lite0-1scale

repro-lite0-dedup-1scale: $(STAMP)
	bash experiments/repro.sh voc07_lite0_dedup_1scale voc07-lite0-dedup-1scale
