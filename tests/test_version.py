"""The version is written once, in simclr_ext/_version.py: setup.py reads it from there (without importing the
package), so the built distribution, the installed metadata and simclr_ext.__version__ cannot disagree."""
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

import simclr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_a_release_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+", simclr_ext.__version__), simclr_ext.__version__


def test_setup_py_reads_the_package_version():
    """`setup.py --version` is what pip records as the distribution's version."""
    env = dict(os.environ, SIMCLR_EXT_CUDA="0")  # no CUDA arch resolution: only the metadata is asked for
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == simclr_ext.__version__


def test_setup_py_has_no_version_of_its_own():
    with open(os.path.join(ROOT, "setup.py")) as f:
        source = f.read()
    literal = re.search(r"""version\s*=\s*["']|VERSION\s*=""", source)
    assert literal is None, f"setup.py writes a version of its own ({literal.group(0)!r}): read simclr_ext/_version.py"


def test_installed_metadata_matches_the_package():
    try:
        installed = importlib.metadata.version("simclr_ext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("simclr_ext is not installed (run from a source tree on PYTHONPATH): no metadata to compare")
    assert installed == simclr_ext.__version__, (
        f"installed metadata says {installed}, simclr_ext.__version__ is {simclr_ext.__version__}: "
        "reinstall (pip install --no-build-isolation -e .)")
