"""Shared test setup."""

from __future__ import annotations

import pytest
import torch

from sppdet.device import set_threads


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite: every op here is tiny, and on a busy 2-core
    machine two OpenMP threads per op made them many times slower (up to 20x for the depthwise
    float64 convs of ``measure_geometry``); one thread also keeps float sums bitwise repeatable.
    The numba SPP kernel too (sppdet.device.set_threads: the caller sets both, once)."""
    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)
