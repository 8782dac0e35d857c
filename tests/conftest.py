import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests are tiny: one intra-op thread is faster and deterministic on a 2-core CI box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
