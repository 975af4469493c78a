"""benchmarks/calibrate_photometry.py: the fractional systematic that restores 68% coverage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from calibrate_photometry import blend_model_coverage, fit_blend_model, fit_sys, per_bin  # noqa: E402


def test_fit_sys_recovers_a_known_fractional_error():
    rng = np.random.default_rng(0)
    n = 4000
    truth = rng.uniform(1e3, 1e5, n)
    stat = 0.01 * truth  # stated statistical error: 1%
    # actual errors: 1% statistical plus a 6% fractional systematic
    mean = truth * (1 + 0.06 * rng.standard_normal(n)) + stat * rng.standard_normal(n)
    rows = [{"truth": t, "mean": m, "sd": s} for t, m, s in zip(truth, mean, stat, strict=True)]
    (eps, power), cov = fit_sys(rows)
    assert abs(eps - 0.06) < 0.006 and power == 1.0
    assert abs(cov[(eps, power)][0] - 0.68) < 0.02 and abs(cov[(eps, power)][1] - 0.95) < 0.02
    assert cov[(0.0, 1.0)][0] < 0.3  # the stated errors alone under-cover


def test_fit_sys_power_holds_coverage_in_every_snr_bin():
    """A systematic that grows more slowly than the inflation (power 0.5): fitting the power
    per S/N bin recovers it; power 1 over-covers the bin with large inflation."""
    rng = np.random.default_rng(1)
    n = 6000
    truth = rng.uniform(1e3, 1e5, n)
    snr = rng.choice([20.0, 45.0, 100.0, 400.0], n)
    infl = np.where(snr > 150, 9.0, 1.0)  # bright sources: large footprint chi^2
    stat = truth / snr
    mean = truth * (1 + 0.05 * np.sqrt(infl) ** 0.5 * rng.standard_normal(n)) \
        + stat * rng.standard_normal(n)
    rows = [{"truth": t, "mean": m, "sd": s, "snr": q, "inflation": i}
            for t, m, s, q, i in zip(truth, mean, stat, snr, infl, strict=True)]
    (eps, power), _ = fit_sys(rows, powers=np.round(np.linspace(0, 1.5, 16), 3))
    assert abs(power - 0.5) <= 0.1 and abs(eps - 0.05) < 0.008
    bins = per_bin(rows, eps, power)
    assert all(abs(b[3] - 0.68) < 0.04 for b in bins)
    (e1, _), _ = fit_sys(rows)
    assert per_bin(rows, e1, 1.0)[-1][3] > 0.75  # power 1: the bright bin over-covers


def test_fit_shapes_recovers_a_known_absolute_shape_error():
    """Shapes whose stated widths shrink with S/N but carry a 0.02 model error (in half the
    conformal shear): the fitted shape_sys is ~0.02 and restores 68 % coverage in the bright
    bin, where the stated widths alone under-cover."""
    from calibrate_photometry import fit_shapes

    rng = np.random.default_rng(2)
    n = 400
    snr = rng.choice([20.0, 45.0, 100.0, 400.0], n)
    sd = 2.0 / snr  # stated statistical width: 0.1 at S/N 20, 0.005 at S/N 400
    truth = rng.normal(0, 0.25, (n, 2))
    med = truth + sd[:, None] * rng.standard_normal((n, 2)) + 0.02 * rng.standard_normal((n, 2))
    rows = [{"eta_truth": t.tolist(), "eta_median": m.tolist(), "eta_half_width": [s, s],
             "snr": q} for t, m, s, q in zip(truth, med, sd, snr, strict=True)]
    out = fit_shapes(rows, grid=(0.0, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04), dfs=(np.inf,))
    assert abs(out["shape_sys"] - 0.02) <= 0.0051
    assert out["shape_coverage_68_95_without"][0] < 0.6
    for comp in ("e1", "e2"):
        bright = out["shape_coverage_per_snr_bin"][comp]["with"][-1]
        assert bright[2] > 70 and abs(bright[3] - 0.68) < 0.1


def test_fit_blend_model_recovers_a_blendedness_dependent_model():
    """Errors drawn from the catalogue's model (Student-t on the whole error, growing with
    blendedness): the maximum-likelihood fit recovers its parameters (the model's scale uses
    the measured flux, as the catalogue does, which biases ``stat_blend`` up a little) and
    its intervals hold 68 / 95 % in every blendedness bin, where the statistical errors
    alone do not."""
    from probdeblend.photometry import flux_draws

    rng = np.random.default_rng(2)
    n = 6000
    truth = rng.uniform(1e3, 1e5, n)
    beta = rng.choice([0.0, 0.1, 0.3, 0.7], n)
    infl = rng.uniform(1.0, 4.0, n)
    sd = truth / rng.uniform(20, 300, n) * np.sqrt(infl)  # stated sd, inflation included
    # one draw per source from the photometry's own sampler (G = n blends of one source)
    d = flux_draws(truth[:, None, None, None], (sd**2 / infl)[:, None, None, None, None],
                   infl[:, None, None], 1, rng, flux_sys=0.02, power=1.0, df=5.0,
                   tail="total", flux_sys_blend=0.06, stat_blend=2.0,
                   blendedness=beta[:, None])
    mean = d["flux"][:, 0, 0, 0]
    rows = [{"truth": t, "mean": m, "sd": s, "inflation": i, "blendedness": b, "snr": t / s}
            for t, m, s, i, b in zip(truth, mean, sd, infl, beta, strict=True)]
    fit = fit_blend_model(rows)
    assert abs(fit["flux_sys"] - 0.02) < 0.004 and abs(fit["flux_sys_blend"] - 0.06) < 0.015
    assert 1.5 < fit["stat_blend"] < 3.5 and abs(fit["power"] - 1.0) < 0.2
    assert 3.0 < fit["df"] < 8.0 and fit["tail"] == "total" and fit["stat_scale"] == 1.0
    cov = blend_model_coverage(rows, fit)
    for _, _, _, c68, c95 in cov["blendedness"]:
        assert abs(c68 - 0.68) < 0.03 and abs(c95 - 0.95) < 0.02
    alone = blend_model_coverage(rows, {**fit, "flux_sys": 0.0, "flux_sys_blend": 0.0,
                                    "stat_blend": 0.0, "df": 1e9})
    assert alone["blendedness"][-1][3] < 0.45  # the blended sources' stated errors under-cover


def test_fit_blend_model_recovers_a_snr_dependent_systematic():
    """The Laplace posterior's model: a fractional systematic that grows with the source's
    S/N, ``flux_sys * (nu / 100) ** snr_power``; the maximum-likelihood fit of
    ``LAPLACE_FREE`` recovers it, and its intervals hold 68 % at low and high S/N alike,
    where one fractional term over-covers the middle and under-covers the bright end."""
    from calibrate_photometry import LAPLACE_FREE

    rng = np.random.default_rng(5)
    n = 6000
    truth = rng.uniform(1e3, 1e5, n)
    nu = np.exp(rng.uniform(np.log(20.0), np.log(600.0), n))
    beta = rng.choice([0.0, 0.2, 0.6], n)
    sd = truth / nu
    eps = (0.012 + 0.05 * beta) * (nu / 100.0) ** 0.8
    mean = truth + np.hypot(sd, eps * truth) * rng.standard_t(8.0, n)
    rows = [{"truth": t, "mean": m, "sd": s, "snr": q, "snr_model_sum": q, "blendedness": b}
            for t, m, s, q, b in zip(truth, mean, sd, nu, beta, strict=True)]
    fit = fit_blend_model(rows, LAPLACE_FREE)
    assert abs(fit["flux_sys"] - 0.012) < 0.003 and abs(fit["snr_power"] - 0.8) < 0.15
    assert abs(fit["flux_sys_blend"] - 0.05) < 0.015
    assert fit["stat_blend"] == 0.0 and fit["power"] == 0.0
    for _, _, n_bin, c68, _ in blend_model_coverage(rows, fit)["snr"]:
        assert n_bin < 300 or abs(c68 - 0.68) < 0.05
    flat = fit_blend_model(rows, ("flux_sys",))
    cells = blend_model_coverage(rows, flat)["snr"]
    assert cells[-1][3] < 0.62  # one fractional term: the brightest bin under-covered
