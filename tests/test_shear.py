"""Shear posterior on synthetic ensembles where the truth is exact."""

from __future__ import annotations

import numpy as np
import pytest

from probdeblend import shear


def _ensemble(g, n_gal=2000, n_draw=100, sigma=0.25, sigma_n=0.1, seed=0):
    """Intrinsic shapes from the interim prior, sheared analytically, observed with Gaussian
    noise; per-galaxy posterior draws are exact (conjugate Gaussian under the interim prior)."""
    rng = np.random.default_rng(seed)
    e_int = sigma * (rng.standard_normal(n_gal) + 1j * rng.standard_normal(n_gal))
    e_int = e_int[np.abs(e_int) < 1]
    e = (e_int + g) / (1 + np.conj(g) * e_int)
    obs = e + sigma_n * (rng.standard_normal(e.shape) + 1j * rng.standard_normal(e.shape))
    tau2 = 1 / (1 / sigma**2 + 1 / sigma_n**2)
    mu = tau2 * obs / sigma_n**2
    draws = mu[:, None] + np.sqrt(tau2) * (rng.standard_normal((len(mu), n_draw))
                                           + 1j * rng.standard_normal((len(mu), n_draw)))
    return np.stack([draws.real, draws.imag], -1)


@pytest.mark.parametrize("g", [0.03 - 0.02j, -0.02 + 0.0j])
def test_recovers_known_shear(g):
    draws = _ensemble(g)
    idata = shear.infer(draws, sigma_e=0.25, n_grid=21)
    a = idata.attrs
    # posterior mean within 4 sigma of the truth, sigma of the expected size (shape noise / sqrt N)
    assert abs(a["g1_mean"] - g.real) < 4 * a["g1_sd"]
    assert abs(a["g2_mean"] - g.imag) < 4 * a["g2_sd"]
    assert 0.002 < a["g1_sd"] < 0.015
    post = idata.posterior
    assert post["g1"].shape == (1, 4000)
    assert abs(float(post["g1"].mean()) - a["g1_mean"]) < 0.5 * a["g1_sd"]


def test_unsheared_ensemble_is_consistent_with_zero():
    idata = shear.infer(_ensemble(0j, seed=3), sigma_e=0.25, n_grid=21)
    assert abs(idata.attrs["g1_mean"]) < 4 * idata.attrs["g1_sd"]
    assert abs(idata.attrs["g2_mean"]) < 4 * idata.attrs["g2_sd"]


def test_likelihood_peaks_at_truth_without_noise():
    draws = _ensemble(0.05 + 0.0j, n_gal=4000, sigma_n=1e-3, seed=1)
    grid = np.array([0.0, 0.05, 0.1]) + 0j
    ll = shear.log_likelihood(grid, draws, 0.25)
    assert np.argmax(ll) == 1


def test_multiplicative_bias_fit():
    rng = np.random.default_rng(0)
    g = np.repeat([-0.02, 0.02], 500)
    est = 1.03 * g + 0.001 + 1e-3 * rng.standard_normal(g.size)
    fit = shear.multiplicative_bias(g, est)
    assert fit["m"] == pytest.approx(0.03, abs=4 * fit["m_err"])
    assert fit["c"] == pytest.approx(0.001, abs=4 * fit["c_err"])


def test_bad_draws_shape():
    with pytest.raises(ValueError, match="galaxy, draw, 2"):
        shear.infer(np.zeros((10, 5)), sigma_e=0.25)
