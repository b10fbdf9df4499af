from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Each test gets torch's thread count back as it found it (the trainers set it from their settings: tiny tensors
    train on one thread, as thread hand-offs cost more than they save and a busy CI machine makes them much worse)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
