"""The fused op never builds the 2N x 2N similarity matrix: its peak memory grows linearly with N."""
import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "memory_probe.py")


def _peak_bytes(which, two_n, d):
    out = subprocess.run([sys.executable, PROBE, which, str(two_n), str(d)], capture_output=True, text=True,
                         timeout=600, env=os.environ)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_far_below_similarity_matrix():
    two_n, d = 16384, 128
    matrix_bytes = two_n * two_n * 4  # one float32 2N x 2N matrix: 1 GiB; the reference holds several
    peak = _peak_bytes("fused", two_n, d)
    assert peak < 0.1 * matrix_bytes, f"fused forward+backward peak {peak / 2**20:.1f} MiB at 2N={two_n}"
    # Linear, not quadratic: 4x the batch costs about 4x the memory (16x for a materialized matrix).
    small = _peak_bytes("fused", two_n // 4, d)
    assert peak < 6 * small, f"peak {peak / 2**20:.1f} MiB at 2N={two_n} vs {small / 2**20:.1f} MiB at 2N={two_n // 4}"


def test_reference_probe_sees_the_matrix():
    """The probe itself can tell: the reference's peak at 2N=2048 includes its 16 MiB matrices."""
    assert _peak_bytes("reference", 2048, 32) > 2048 * 2048 * 4
