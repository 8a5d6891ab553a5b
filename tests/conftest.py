import hashlib
import os
import random

import pytest
import torch

# Every random draw of a test derives from one seed, a stable hash of the test's node id (the same on every
# run and machine, unlike Python's salted hash()), so a tolerance failure in a log can be replayed.
# SIMCLR_EXT_TEST_SEED=random draws a fresh seed per test (fuzzing); SIMCLR_EXT_TEST_SEED=<int> gives every
# test that seed (replay one test with -k or its node id).
SEED_ENV = "SIMCLR_EXT_TEST_SEED"
_SEED_BITS = (1 << 63) - 1


def _seed_setting():
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return None
    if raw.lower() == "random":
        return "random"
    try:
        value = int(raw, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= _SEED_BITS:
        raise pytest.UsageError(f"{SEED_ENV} must be unset, 'random' or an integer in [0, 2**63), got {raw!r}")
    return value


def _hash63(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & _SEED_BITS


def test_seed_for(nodeid):
    """The seed of the test `nodeid` under the current SIMCLR_EXT_TEST_SEED setting."""
    setting = _seed_setting()
    if setting is None:
        return _hash63(nodeid)
    if setting == "random":
        return int.from_bytes(os.urandom(8), "little") & _SEED_BITS
    return setting



def derived_seed(seed, stream):
    """Independent streams from one test seed: a generator and the global RNGs never draw the same numbers."""
    return _hash63(f"{seed}:{stream}")


def pytest_configure(config):
    _seed_setting()  # a bad value stops the run before any test


def pytest_report_header(config):
    setting = _seed_setting()
    if setting is None:
        how = "a hash of each test's node id"
    elif setting == "random":
        how = "fresh random seeds (printed per test)"
    else:
        how = f"{setting} for every test"
    return f"test seeds: {how} ({SEED_ENV}=random to fuzz, {SEED_ENV}=<seed> to replay)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def test_seed(request):
    """This test's seed, printed (a failure shows it under "Captured stdout setup") and recorded in the
    JUnit XML: rerun with SIMCLR_EXT_TEST_SEED=<seed> to replay the failure."""
    seed = test_seed_for(request.node.nodeid)
    print(f"test seed: {seed} (replay: {SEED_ENV}={seed} pytest '{request.node.nodeid}')")
    request.node.user_properties.append(("test_seed", seed))
    return seed


@pytest.fixture(autouse=True)
def _seed_global_rngs(test_seed):
    """torch's, Python's and NumPy's global generators, seeded from the test seed before every test."""
    torch.manual_seed(derived_seed(test_seed, "torch"))
    random.seed(derived_seed(test_seed, "random"))
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(derived_seed(test_seed, "numpy") % (1 << 32))


@pytest.fixture
def gen(test_seed):
    """A CPU generator seeded from the test seed: the same inputs on every run of this test (and every device)."""
    return torch.Generator().manual_seed(derived_seed(test_seed, "gen"))
