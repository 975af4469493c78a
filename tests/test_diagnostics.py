"""Tests of probdeblend.diagnostics on synthetic draws (numpy) with known statistics."""

from __future__ import annotations

import warnings

import galsim
import matplotlib
import numpy as np
import pytest

from probdeblend import Scene
from probdeblend.diagnostics import (
    CONVENTIONS,
    LATENT_DIM,
    ConvergenceWarning,
    check_convergence,
    plot_corner,
    plot_scene,
    plot_trace,
    summary_table,
    to_inference_data,
)

matplotlib.use("Agg")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

BANDS = ("u", "g", "r", "i", "z", "y")
NY = NX = 24
N_SOURCE, N_LATENT = 2, 4
IDS = [17, 42]


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(1)
    psf = galsim.Gaussian(fwhm=0.8).drawImage(nx=11, ny=11, scale=0.2).array
    psf = np.stack([psf / psf.sum()] * len(BANDS))
    var = np.full((len(BANDS), NY, NX), 100.0)
    var[2, 0, :3] = np.inf  # a few masked r-band pixels
    image = rng.normal(0, 10.0, var.shape)
    return Scene(image, var, psf, BANDS, 0.2, positions=[[6.0, 8.0], [15.5, 14.0]])


def _draws(rng, n_chain=2, n_draw=100, shift=0.0):
    """iid draws; chain c is offset by c * shift (in units of each variable's sd)."""
    off = shift * np.arange(n_chain)

    def normal(loc, sd, tail):
        x = rng.normal(loc, sd, (n_chain, n_draw) + tail)
        return x + (off * sd).reshape((n_chain,) + (1,) * (x.ndim - 1))

    S, B = N_SOURCE, len(BANDS)
    return {
        "flux": normal(np.array([[1000.0] * B, [500.0] * B]), 20.0, (S, B)),
        "e1": normal(np.array([0.1, -0.2]), 0.05, (S,)),
        "e2": normal(np.array([0.0, 0.3]), 0.05, (S,)),
        "x": normal(np.array([6.0, 15.5]), 0.1, (S,)),
        "y": normal(np.array([8.0, 14.0]), 0.1, (S,)),
        "latent": normal(0.0, 1.0, (S, N_LATENT)),
        "hlr": normal(0.5, 0.05, (S,)),
    }


def _stats(rng, n_chain=2, n_draw=100, n_div=0):
    div = np.zeros((n_chain, n_draw), dtype=bool)
    div.flat[:n_div] = True
    return {"lp": rng.normal(size=(n_chain, n_draw)), "diverging": div,
            "acceptance_rate": rng.uniform(0.6, 1.0, (n_chain, n_draw)),
            "tree_depth": np.full((n_chain, n_draw), 3)}


@pytest.fixture(scope="module")
def idata(scene):
    rng = np.random.default_rng(0)
    draws = _draws(rng)
    pp = rng.normal(size=(2, 10) + scene.image.shape)
    ll = rng.normal(size=(2, 100, len(BANDS)))
    out = to_inference_data(draws, _stats(rng), scene, source_ids=IDS, posterior_predictive=pp,
                            log_likelihood=ll, attrs={"method": "nuts", "prior": "test"},
                            predictive_draw_index=np.arange(0, 100, 10))
    return out, draws


def test_groups_dims_coords(idata, scene):
    data, draws = idata
    for group in ("posterior", "sample_stats", "observed_data", "posterior_predictive",
                  "log_likelihood"):
        assert hasattr(data, group), group
    post = data.posterior
    assert list(post.coords["source"].values) == IDS
    assert tuple(post.coords["band"].values) == BANDS
    assert list(post.coords[LATENT_DIM].values) == list(range(N_LATENT))
    assert post["flux"].dims == ("chain", "draw", "source", "band")
    assert post["e1"].dims == ("chain", "draw", "source")
    assert post["latent"].dims == ("chain", "draw", "source", LATENT_DIM)
    assert post["hlr"].dims == ("chain", "draw", "source")
    assert "latent" in post.data_vars  # a data variable, not a coordinate
    np.testing.assert_array_equal(post["flux"].values, draws["flux"])
    obs = data.observed_data
    assert obs["image"].dims == ("band", "y", "x")
    np.testing.assert_array_equal(obs["image"].values, scene.image)
    assert list(obs.data_vars) == ["image"]  # constants live in constant_data (test_results)
    assert post["x"].dims == ("chain", "draw", "source")  # legacy alias keeps the caller's names
    assert list(obs.coords["x"].values) == list(range(NX))
    pp = data.posterior_predictive["image"]
    assert pp.dims == ("chain", "draw", "band", "y", "x") and pp.sizes["draw"] == 10
    assert list(pp.coords["draw"].values) == list(range(0, 100, 10))
    assert data.log_likelihood["obs"].dims == ("chain", "draw", "band")
    assert set(data.sample_stats.data_vars) >= {"lp", "diverging", "acceptance_rate"}
    for attrs in (data.attrs, post.attrs):
        assert attrs["method"] == "nuts" and attrs["prior"] == "test"
        assert attrs["units"] == "electron" and attrs["conventions"] == CONVENTIONS
        assert "probdeblend_version" in attrs


def test_arviz_functions_run(idata):
    data, draws = idata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = az.summary(data, var_names=["flux", "e1"], coords={"source": [42], "band": ["r"]})
        rhat = az.rhat(data, var_names=["flux", "e1", "e2"])
        ess = az.ess(data, var_names=["e1"])
    assert "flux[42, r]" in s.index and "e1[42]" in s.index
    assert s.loc["e1[42]", "mean"] == pytest.approx(draws["e1"][..., 1].mean(), abs=1e-3)
    assert rhat["flux"].dims == ("source", "band")
    assert np.all(np.asarray(ess["e1"]) > 50)


def test_summary_table_matches_numpy(idata):
    data, draws = idata
    t = summary_table(data, pareto_k=[0.2, 0.8])
    assert list(t["id"]) == IDS
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}
    np.testing.assert_allclose(t["x"], flat["x"].mean(0))
    np.testing.assert_allclose(t["y"], flat["y"].mean(0))
    for k, band in enumerate(BANDS):
        np.testing.assert_allclose(t[f"flux_{band}"], flat["flux"][:, :, k].mean(0))
        np.testing.assert_allclose(t[f"flux_{band}_err"], flat["flux"][:, :, k].std(0, ddof=1))
        np.testing.assert_allclose(t[f"flux_{band}_lo"],
                                   np.percentile(flat["flux"][:, :, k], 16, axis=0))
        np.testing.assert_allclose(t[f"flux_{band}_hi"],
                                   np.percentile(flat["flux"][:, :, k], 84, axis=0))
    for name in ("e1", "e2"):
        np.testing.assert_allclose(t[name], flat[name].mean(0))
        np.testing.assert_allclose(t[f"{name}_err"], flat[name].std(0, ddof=1))
    # r_hat / ess_bulk: worst over the source's flux, e1, e2 as computed by ArviZ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(data, var_names=["flux", "e1", "e2"])
        ess = az.ess(data, var_names=["flux", "e1", "e2"], method="bulk")
    for i, sid in enumerate(IDS):
        worst = max(float(rhat["flux"].sel(source=sid).max()), float(rhat["e1"].sel(source=sid)),
                    float(rhat["e2"].sel(source=sid)))
        assert t["r_hat"][i] == pytest.approx(worst)
        least = min(float(ess["flux"].sel(source=sid).min()), float(ess["e1"].sel(source=sid)),
                    float(ess["e2"].sel(source=sid)))
        assert t["ess_bulk"][i] == pytest.approx(least)
    np.testing.assert_allclose(t["pareto_k"], [0.2, 0.8])
    assert t["flux_r"].unit == "electron" and t["x"].unit == "pix"
    assert np.all(summary_table(data, pareto_k=0.5)["pareto_k"] == 0.5)


def test_single_chain_rhat_nan(scene):
    rng = np.random.default_rng(3)
    draws = {k: v[:1] for k, v in _draws(rng, n_draw=200).items()}
    data = to_inference_data(draws, None, scene)
    assert list(data.posterior.coords["source"].values) == [0, 1]
    t = summary_table(data)
    assert np.all(np.isnan(t["r_hat"])) and np.all(t["ess_bulk"] > 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = check_convergence(data, ess_min=50)
    assert res["r_hat"]["flux"] is None and "R-hat skipped" in res["notes"][0]
    assert res["n_divergent"] is None and res["ok"]


def test_check_convergence_warns_on_separated_chains(scene):
    rng = np.random.default_rng(4)
    data = to_inference_data(_draws(rng, n_chain=4, n_draw=200, shift=2.0),
                             _stats(rng, 4, 200), scene)
    with pytest.warns(ConvergenceWarning) as record:
        res = check_convergence(data)
    assert len(record) == 1  # one warning listing every failure
    msg = str(record[0].message)
    assert "R-hat flux[source=" in msg and "> 1.01" in msg and "more samples" in msg
    assert res["r_hat"]["flux"] > 1.5 and not res["ok"]
    assert res["n_divergent"] == 0


def test_check_convergence_quiet_on_mixed_chains(scene):
    rng = np.random.default_rng(5)
    data = to_inference_data(_draws(rng, n_chain=4, n_draw=2000), _stats(rng, 4, 2000), scene)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = check_convergence(data, ess_min=2000)
    assert res["ok"] and not res["failures"]
    assert all(v < 1.01 for v in res["r_hat"].values())
    assert all(v > 2000 for v in res["ess_bulk"].values())


def test_check_convergence_divergences_and_ess(scene):
    rng = np.random.default_rng(6)
    data = to_inference_data(_draws(rng), _stats(rng, n_div=3), scene)
    with pytest.warns(ConvergenceWarning, match="3 divergent") as record:
        res = check_convergence(data, r_hat_max=10.0, ess_min=1e6)
    assert "bulk ESS" in str(record[0].message) and "target_accept" in str(record[0].message)
    assert res["n_divergent"] == 3
    quiet = check_convergence(data, r_hat_max=10.0, ess_min=1e6, warn=False)
    assert not quiet["ok"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.pop("e2"), "missing"),
        (lambda d: d.update(flux=d["flux"][..., :3]), "flux"),
        (lambda d: d.update(x=d["x"][:, :50]), "x"),
        (lambda d: d.update(e1=d["e1"][..., :1]), "e1"),
    ],
)
def test_bad_draws(scene, change, match):
    draws = _draws(np.random.default_rng(7))
    change(draws)
    with pytest.raises(ValueError, match=match):
        to_inference_data(draws, None, scene)


def test_bad_ids_and_predictive(scene):
    draws = _draws(np.random.default_rng(8))
    with pytest.raises(ValueError, match="source_ids"):
        to_inference_data(draws, None, scene, source_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="source_ids"):
        to_inference_data(draws, None, scene, source_ids=[1, 1])
    with pytest.raises(ValueError, match="posterior_predictive"):
        to_inference_data(draws, None, scene, posterior_predictive=np.zeros((2, 5, 6, 8, 8)))
    with pytest.raises(ValueError, match="log_likelihood"):
        to_inference_data(draws, None, scene, log_likelihood=np.zeros((2, 100, 3)))


def test_plots_write_png(idata, scene, tmp_path):
    from matplotlib.figure import Figure

    data, _ = idata
    model = np.zeros(scene.image.shape)
    for path, make in [
        (tmp_path / "scene.png", lambda p: plot_scene(scene, model + 50.0, path=p)),
        (tmp_path / "corner.png", lambda p: plot_corner(
            data, source=42, bands=("r", "i"), truth={"flux_r": 500.0, "g1": -0.2, "e2": 0.3},
            path=p)),
        (tmp_path / "trace.png", lambda p: plot_trace(data, source=17, path=p)),
    ]:
        fig = make(path)
        assert isinstance(fig, Figure)
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_scene(scene, model)  # no path: returned, not saved
    assert len(fig.axes) >= 3
    with pytest.raises(ValueError, match="source"):
        plot_corner(data, source=3)
    with pytest.raises(ValueError, match="bands"):
        plot_corner(data, source=17, bands=("q",))


def test_failed_shapes_are_reported_not_nan(scene):
    """Shapes that fail on some draws: summaries over the measured draws, a per-source failed
    fraction, and a convergence failure that names the variable."""
    rng = np.random.default_rng(3)
    draws = _draws(rng)
    draws["e1"][0, :10, 1] = np.nan  # 10 of 200 draws of source 1
    draws["e2"][0, :10, 1] = np.nan
    idata = to_inference_data(draws, _stats(rng), scene, source_ids=IDS,
                              attrs={"method": "nuts"})
    t = summary_table(idata)
    assert np.all(np.isfinite(t["e1"])) and np.all(np.isfinite(t["e2"]))
    np.testing.assert_allclose(t["e_failed"], [0.0, 10 / 200])
    res = check_convergence(idata, warn=False)
    assert any(f.startswith("e1:") and "NaN" in f for f in res["failures"])
