"""The tests' seeds (tests/conftest.py): a stable hash of the node id, the same in every process; overridden
by SIMCLR_EXT_TEST_SEED for fuzzing (random) and replay (an integer); every generator of a test derived from it."""
import os
import subprocess
import sys

import conftest
import pytest
import torch

NODE = "tests/test_x.py::test_y[cpu-fp32]"


def test_seed_is_the_same_in_every_process(monkeypatch):
    """Not Python's hash(), which is salted per process: two interpreters with other hash seeds agree."""
    monkeypatch.delenv(conftest.SEED_ENV, raising=False)
    code = f"import conftest; print(conftest.test_seed_for({NODE!r}))"
    seeds = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        env.pop(conftest.SEED_ENV, None)
        out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, check=True,
                             capture_output=True, text=True).stdout
        seeds.add(int(out))
    assert seeds == {conftest.test_seed_for(NODE)}
    assert 0 <= conftest.test_seed_for(NODE) < 2**63
    assert conftest.test_seed_for(NODE) != conftest.test_seed_for(NODE.replace("cpu", "cuda"))


def test_environment_replays_and_fuzzes(monkeypatch):
    monkeypatch.setenv(conftest.SEED_ENV, "12345")
    assert conftest.test_seed_for(NODE) == conftest.test_seed_for("another") == 12345
    monkeypatch.setenv(conftest.SEED_ENV, "random")
    assert len({conftest.test_seed_for(NODE) for _ in range(4)}) == 4
    for bad in ("abc", "-1", str(2**63), "1.5"):
        monkeypatch.setenv(conftest.SEED_ENV, bad)
        with pytest.raises(pytest.UsageError, match=f"{conftest.SEED_ENV} must be unset, 'random' or an integer"):
            conftest.test_seed_for(NODE)


def test_every_generator_derives_from_the_test_seed(gen, test_seed, request):
    if os.environ.get(conftest.SEED_ENV, "").strip().lower() != "random":
        assert test_seed == conftest.test_seed_for(request.node.nodeid)
    assert gen.initial_seed() == conftest.derived_seed(test_seed, "gen")
    assert torch.initial_seed() == conftest.derived_seed(test_seed, "torch")
    assert ("test_seed", test_seed) in request.node.user_properties
    # Independent streams: the fixture's generator does not repeat the global one's numbers.
    assert not torch.equal(torch.rand(8, generator=gen), torch.rand(8))
