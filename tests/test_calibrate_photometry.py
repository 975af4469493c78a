"""benchmarks/calibrate_photometry.py: the fractional systematic that restores 68% coverage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from calibrate_photometry import fit_sys  # noqa: E402


def test_fit_sys_recovers_a_known_fractional_error():
    rng = np.random.default_rng(0)
    n = 4000
    truth = rng.uniform(1e3, 1e5, n)
    stat = 0.01 * truth  # stated statistical error: 1%
    # actual errors: 1% statistical plus a 6% fractional systematic
    mean = truth * (1 + 0.06 * rng.standard_normal(n)) + stat * rng.standard_normal(n)
    rows = [{"truth": t, "mean": m, "sd": s} for t, m, s in zip(truth, mean, stat, strict=True)]
    eps, cov = fit_sys(rows)
    assert abs(eps - 0.06) < 0.006
    assert abs(cov[eps][0] - 0.68) < 0.02 and abs(cov[eps][1] - 0.95) < 0.02
    assert cov[0.0][0] < 0.3  # the stated errors alone under-cover
