import hashlib
import os
import random

import emulated_cuda
import pytest
import torch
from emulated_cuda import is_emulated
from parity import EMU_MAX_CASES, EMU_MAX_DIM, EMU_MAX_ROWS

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


def _emulated(item):
    """The cuda-emu device parameter of a test item, or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return next((v for v in params.values() if is_emulated(v)), None)


def _too_large_to_emulate(item):
    """A cuda-emu case with a size parameter above parity.EMU_MAX_ROWS (EMU_MAX_DIM for d)."""
    for name, value in item.callspec.params.items():
        if isinstance(value, int) and not isinstance(value, bool):
            if value > (EMU_MAX_DIM if name in ("d", "dim") else EMU_MAX_ROWS):
                return True
    return False


def _emulated_cases_left_out(items):
    """The cuda-emu items beyond parity's budget: too large, or past EMU_MAX_CASES of their test function
    (the kept ones spread evenly over the function's parameter grid, the same on every run)."""
    per_function = {}
    for item in items:
        if _emulated(item) is not None and not _too_large_to_emulate(item):
            per_function.setdefault(item.nodeid.split("[")[0], []).append(item)
    kept = set()
    for cases in per_function.values():
        step = max(1, -(-len(cases) // EMU_MAX_CASES))
        kept.update(id(item) for item in cases[::step])
    return [item for item in items if _emulated(item) is not None and id(item) not in kept]


def pytest_collection_modifyitems(config, items):
    left_out = _emulated_cases_left_out(items)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        dropped = {id(item) for item in left_out}
        items[:] = [item for item in items if id(item) not in dropped]
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


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): many tiny calls run fastest so, and OpenMP workers
    spinning on a busy machine only slow them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _route_emulated_cuda(request):
    """A cuda-emu test calls the emulated CUDA kernels wherever it calls simclr_ext's ops."""
    if _emulated(request.node) is None:
        yield
        return
    with emulated_cuda.routed():
        yield


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
