"""The CPU peak-memory window of a training epoch (gmbench.training)."""

import sys

import pytest
import torch

from gmbench.training import peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak RSS is reset through Linux's /proc/self/clear_refs")
def test_a_reset_starts_a_new_peak_window_below_an_earlier_large_allocation():
    reset_peak_memory(CPU)
    baseline = peak_memory_mb(CPU)  # right after a reset: what is resident now
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched, so resident
    assert peak_memory_mb(CPU) >= baseline + 400
    del big
    reset_peak_memory(CPU)
    # The earlier 512 MiB are gone from the new window (the process's lifetime maximum would keep them).
    assert peak_memory_mb(CPU) < baseline + 256


def test_the_peak_is_at_least_what_is_resident_now():
    reset_peak_memory(CPU)
    held = torch.ones(128 * 2**20 // 4)
    assert peak_memory_mb(CPU) >= 100
    del held
