"""ISNE tests run with one torch thread: their steps are tiny, and on a 2-core box intra-op threads
spin against each other (about 10x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
