"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (small matrices: extra threads only add overhead, and the suite runs
    on 2 cores), then put the caller's thread count back."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
