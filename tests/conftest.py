import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A freshly seeded generator per test: new inputs every run, the seed shown when a test fails."""
    g = torch.Generator()
    print(f"generator seed: {g.seed()}")
    return g
