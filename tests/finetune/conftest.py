import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(_seed):
    """Fine-tune tests use tiny nets: one intra-op thread is as fast, and on a shared 2-core machine
    two OpenMP threads can be several times slower than one (threads spin-wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
