"""Tiny-model training tests run single-threaded: faster on one thread, and two OpenMP threads on
a busy 2-core machine spin-wait (measured 60x slower per step)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
