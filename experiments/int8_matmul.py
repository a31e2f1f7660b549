"""Seconds of fc6 (the d17 recipe's 16,000 -> 2,048) on one CPU thread: float32 against
:class:`sppdet.fastpath.Int8Linear` (``torch._int_mm``), which ``--fc-dtype auto`` picks only on
CPUs with int8 dot-product instructions (``sppdet.fastpath.cpu_has_int8_dot``)::

    python -m experiments.int8_matmul --json benchmarks/int8_matmul_epyc_avx2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from experiments.voc07 import machine
from sppdet.fastpath import Int8Linear, cpu_flags, cpu_has_int8_dot
from sppdet.storage import atomic_write_json, git_commit


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="Windows per call.")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)  # a measurement script, not library code
    torch.manual_seed(0)
    fc = nn.Linear(16000, 2048)
    q = Int8Linear(fc)
    x = torch.randn(args.rows, 16000)
    with torch.no_grad():
        f32 = best_of(lambda: fc(x), 5)
        i8 = best_of(lambda: q(x), 2)
    result = {
        "rows": args.rows,
        "shape": [16000, 2048],
        "threads": 1,
        "float32_s": f32,
        "int8_s": i8,
        "int8_over_float32": i8 / f32,
        "cpu_has_int8_dot": cpu_has_int8_dot(),
        "int8_flags": sorted(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}),
        "command": " ".join(["python", "-m", "experiments.int8_matmul", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
    }
    atomic_write_json(args.json, result)
    print(json.dumps({k: result[k] for k in ("float32_s", "int8_s", "int8_over_float32")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
