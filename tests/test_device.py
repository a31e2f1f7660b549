"""Tests of sppdet.device: device names and the process's thread counts (set by the caller)."""

from __future__ import annotations

import numba
import pytest
import torch

from sppdet.device import resolve_device, set_threads
from sppdet.errors import ConfigError
from sppdet.spp import spp_pool


def test_cpu_and_unknown_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")


def test_set_threads_sets_torch_and_numba_and_library_calls_keep_them():
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
        fmap = torch.rand(4, 12, 12)
        spp_pool(fmap, torch.tensor([[0, 0, 5, 5], [2, 3, 11, 11]]), (3, 2, 1))  # numba kernel
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
        set_threads()  # None: numba follows torch's count
        assert numba.get_num_threads() == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
