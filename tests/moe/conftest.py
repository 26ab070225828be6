"""flux.moe tests run tiny fp32 models: one intra-op thread is faster for them and keeps timings
stable when other jobs share the CPU."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
