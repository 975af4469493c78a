"""Tests of probdeblend.results: the InferenceData builder follows the ArviZ schema.

Synthetic draws of a small 2-source, 3-band scene with a Gaussian pixel likelihood, so every
group (pointwise log-likelihood, aligned posterior predictive, deblended images) is exact and
cheap; ArviZ's own functions (summary, plot_trace, loo, netCDF I/O) must run on the result.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest

from probdeblend import Scene
from probdeblend.diagnostics import summary_table
from probdeblend.errors import ArgumentError
from probdeblend.results import (
    LATENT_DIM,
    SCHEMA,
    ImageMoments,
    build_inference_data,
    pointwise_level,
    predictive_draw_index,
)

matplotlib.use("Agg")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

BANDS = ("g", "r", "i")
NY, NX = 16, 18
C, N, S, D = 2, 60, 2, 3
IDS = [3, 8]
TRUE_POS = np.array([[4.0, 5.0], [9.5, 6.5]])


def _blob(x, y, sigma=1.2):
    """Unit-flux Gaussian image(s) at (x, y) (..., ) -> (..., NY, NX)."""
    yy, xx = np.mgrid[:NY, :NX]
    g = np.exp(-((xx - x[..., None, None]) ** 2 + (yy - y[..., None, None]) ** 2) / (2 * sigma**2))
    return g / g.sum((-2, -1), keepdims=True)


@pytest.fixture(scope="module")
def scene():
    yy, xx = np.mgrid[-3:4, -3:4]
    psf = np.exp(-(xx**2 + yy**2) / 2.0)
    psf = np.stack([psf / psf.sum()] * len(BANDS))
    var = np.full((len(BANDS), NY, NX), 4.0)
    var[1, 0, :2] = np.inf  # masked r pixels
    model = (np.array([[200.0], [120.0]])[:, :, None, None] * np.ones((S, 3, 1, 1))
             * _blob(TRUE_POS[:, 0], TRUE_POS[:, 1])[:, None]).sum(0)
    image = model + np.random.default_rng(0).normal(0, 2.0, model.shape)
    image[~np.isfinite(var)] = 0.0
    return Scene(image, var, psf, BANDS, 0.2, positions=TRUE_POS)


@pytest.fixture(scope="module")
def pieces(scene):
    """Draws plus every product a fit computes from them, draw for draw."""
    rng = np.random.default_rng(1)
    x = TRUE_POS[:, 0] + 0.05 * rng.standard_normal((C, N, S))
    y = TRUE_POS[:, 1] + 0.05 * rng.standard_normal((C, N, S))
    flux = np.array([200.0, 120.0])[:, None] * (1 + 0.02 * rng.standard_normal((C, N, S, 3)))
    draws = {
        "flux": flux, "log_flux": np.log(flux),
        "e1": 0.1 + 0.02 * rng.standard_normal((C, N, S)),
        "e2": -0.05 + 0.02 * rng.standard_normal((C, N, S)),
        "x_pix": x, "y_pix": y,
        "offset": np.stack([x, y], -1) - TRUE_POS,
        "latent": rng.standard_normal((C, N, S, D)),
    }
    per_source = flux[..., None, None] * _blob(x, y)[..., None, :, :]  # (C, N, S, B, y, x)
    model = per_source.sum(2)
    var = np.asarray(scene.variance)
    ok = np.isfinite(var)
    resid2 = np.where(ok, (np.asarray(scene.image) - model) ** 2 / np.where(ok, var, 1.0), 0.0)
    ll = np.where(ok, -0.5 * resid2 - 0.5 * np.log(2 * np.pi * np.where(ok, var, 1.0)), 0.0)
    sigma = np.where(ok, np.sqrt(np.where(ok, var, 0.0)), 0.0)
    ppc = model + sigma * rng.standard_normal(model.shape)
    stats = {"lp": ll.sum((2, 3, 4)), "diverging": np.zeros((C, N), bool),
             "acceptance_rate": rng.uniform(0.7, 1.0, (C, N))}
    return {
        "draws": draws, "sample_stats": stats, "log_likelihood": ll,
        "posterior_predictive": ppc,
        "source_images_mean": per_source.mean((0, 1)),
        "source_images_std": per_source.std((0, 1)),
    }


@pytest.fixture(scope="module")
def idata(scene, pieces):
    p = pieces
    return build_inference_data(
        p["draws"], scene, method="nuts", library="numpyro", source_ids=IDS,
        sample_stats=p["sample_stats"], log_likelihood=p["log_likelihood"],
        posterior_predictive=p["posterior_predictive"],
        source_images_mean=p["source_images_mean"], source_images_std=p["source_images_std"],
        positions_given=TRUE_POS, attrs={"prior": "test", "pareto_k": [0.2, 0.9], "seed": 0})


def test_schema_groups_and_names(idata, scene):
    for group in ("posterior", "sample_stats", "observed_data", "constant_data",
                  "posterior_predictive", "log_likelihood", "deblended"):
        assert group in idata.groups(), group
    # the schema rule: no variable shares its name with a dimension, in any group
    for group in idata.groups():
        ds = getattr(idata, group)
        assert not set(ds.data_vars) & set(ds.dims), (group, list(ds.data_vars))
    post = idata.posterior
    assert post["x_pix"].dims == ("chain", "draw", "source") and "x" not in post.data_vars
    assert post["flux"].dims == ("chain", "draw", "source", "band")
    assert post["offset"].dims == ("chain", "draw", "source", "xy")
    assert post["latent"].dims == ("chain", "draw", "source", LATENT_DIM)
    assert list(post.coords["source"].values) == IDS
    assert post["flux"].attrs["units"] == "electron" and post["x_pix"].attrs["units"] == "pix"
    assert list(idata.observed_data.data_vars) == ["image"]
    const = idata.constant_data
    assert set(const.data_vars) == {"variance", "psf", "psf_flux_fraction", "position_given"}
    assert const["psf_flux_fraction"].dims == ("band",)
    assert const["psf"].dims == ("band", "psf_y", "psf_x")
    assert np.isinf(const["variance"].sel(band="r").values[0, 0])
    np.testing.assert_array_equal(const["position_given"].values, TRUE_POS)
    for name in ("inference_library", "inference_library_version", "method",
                 "probdeblend_version", "units", "conventions"):
        assert name in idata.attrs and name in post.attrs, name
    assert idata.attrs["inference_library"] == "numpyro"
    assert idata.attrs["inference_library_version"] != "unknown"
    assert idata.attrs["log_likelihood_level"] == "pixel"
    assert all(v.group in {"posterior", "observed_data", "constant_data", "log_likelihood",
                           "posterior_predictive", "deblended"} for v in SCHEMA)


def test_predictive_and_loglik_aligned(idata):
    post = idata.posterior
    for group in ("posterior_predictive", "log_likelihood"):
        ds = getattr(idata, group)
        assert ds["image"].dims == ("chain", "draw", "band", "y", "x")
        np.testing.assert_array_equal(ds.coords["draw"].values, post.coords["draw"].values)
        np.testing.assert_array_equal(ds.coords["chain"].values, post.coords["chain"].values)
    assert idata.attrs["n_predictive"] == N


def test_deblended_images(idata, pieces, scene):
    deb = idata.deblended
    assert deb["image"].dims == ("source", "band", "y", "x")
    assert deb["image_std"].dims == ("source", "band", "y", "x")
    assert list(deb.coords["source"].values) == IDS
    # the sources' images add up to the posterior-mean scene model, flux conserved per source
    np.testing.assert_allclose(deb["image"].sum("source").values,
                               pieces["posterior_predictive"].mean((0, 1)), atol=1.0)
    np.testing.assert_allclose(deb["image"].sum(("y", "x")).values,
                               pieces["draws"]["flux"].mean((0, 1)), rtol=1e-5)
    assert float(deb["image_std"].min()) >= 0


def test_arviz_summary_and_trace(idata, pieces):
    from matplotlib.figure import Figure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = az.summary(idata, var_names=["flux", "e1", "x_pix"],
                       coords={"source": [8], "band": ["r"]})
        axes = az.plot_trace(idata, var_names=["flux", "e1", "x_pix"],
                             coords={"source": [3], "band": ["g"]})
    assert "x_pix[8]" in s.index and "flux[8, r]" in s.index
    assert s.loc["e1[8]", "mean"] == pytest.approx(pieces["draws"]["e1"][..., 1].mean(), abs=1e-3)
    assert isinstance(np.asarray(axes).ravel()[0].figure, Figure)


def test_loo_pointwise(idata, scene):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    assert loo["n_data_points"] == len(BANDS) * NY * NX
    assert np.isfinite(loo["elpd_loo"])
    assert loo["pareto_k"].dims == ("band", "y", "x")


def test_loglik_per_band_when_large(scene, pieces):
    p = pieces
    assert pointwise_level(C, N, scene) == "pixel"
    assert pointwise_level(C, N, scene, max_pointwise=100) == "band"
    small = build_inference_data(p["draws"], scene, method="nuts",
                                 log_likelihood=p["log_likelihood"], max_pointwise=100)
    ll = small.log_likelihood["image"]
    assert ll.dims == ("chain", "draw", "band")
    np.testing.assert_allclose(ll.values, p["log_likelihood"].sum((-2, -1)))
    assert small.attrs["log_likelihood_level"] == "band"
    assert "max_pointwise" in small.attrs["log_likelihood_note"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert az.loo(small)["n_data_points"] == len(BANDS)


def test_netcdf_round_trip(idata, tmp_path):
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        a, b = getattr(idata, group), getattr(back, group)
        for name in a.data_vars:
            np.testing.assert_array_equal(np.asarray(b[name].values), np.asarray(a[name].values))
    assert back.attrs["inference_library"] == "numpyro"
    np.testing.assert_allclose(back.attrs["pareto_k"], [0.2, 0.9])
    assert list(back.posterior.coords["source"].values) == IDS


def test_explicit_predictive_subset(scene, pieces):
    p = pieces
    idx = predictive_draw_index(N, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == N - 1
    np.testing.assert_array_equal(predictive_draw_index(N, None), np.arange(N))
    pp = p["posterior_predictive"][:, idx]
    out = build_inference_data(p["draws"], scene, posterior_predictive=pp, predictive_draws=idx)
    np.testing.assert_array_equal(out.posterior_predictive.coords["draw"].values, idx)
    assert out.attrs["n_predictive"] == 10
    with pytest.raises(ArgumentError, match="predictive_draws"):  # no silent thinning
        build_inference_data(p["draws"], scene,
                             posterior_predictive=p["posterior_predictive"][:, idx])
    with pytest.raises(ValueError, match="n_predictive"):
        predictive_draw_index(N, 0)


def test_summary_table_reads_pareto_k_and_rounds(idata, pieces):
    t = summary_table(idata)  # pareto_k from idata.attrs, not passed back in
    np.testing.assert_allclose(t["pareto_k"], [0.2, 0.9])
    flat_x = pieces["draws"]["x_pix"].reshape(-1, S)
    np.testing.assert_allclose(t["x"], flat_x.mean(0))  # full precision kept
    assert t["flux_r"].unit == "electron" and t["x"].unit == "pix"
    text = "\n".join(t.pformat(max_width=-1))
    row = t.pformat(max_width=-1)[3].split()
    cols = t.colnames
    e1 = row[cols.index("e1")]
    assert len(e1.split(".")[1]) == 3  # e1 to 3 decimals
    flux = row[cols.index("flux_g")]
    assert len(flux.replace(".", "").lstrip("0")) <= 4  # flux to 4 significant figures
    assert "e+" not in text


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda k: k["draws"].pop("e2"), "draws"),
        (lambda k: k["draws"].update(flux=k["draws"]["flux"][..., :2]), "draws['flux']"),
        (lambda k: k["draws"].update(x=k["draws"].pop("x_pix")[:, :5]), "draws['x']"),
        (lambda k: k.update(log_likelihood=np.zeros((C, N, 2))), "log_likelihood"),
        (lambda k: k.update(source_images_mean=np.zeros((S, 3, NY, NX + 1))),
         "source_images_mean"),
        (lambda k: k.update(positions_given=np.zeros((3, 2))), "positions_given"),
        (lambda k: k.update(source_ids=[1, 1]), "source_ids"),
    ],
)
def test_bad_input_names_the_argument(scene, pieces, change, argument):
    kw = {"draws": dict(pieces["draws"]), "source_ids": None}
    change(kw)
    with pytest.raises(ArgumentError) as err:
        build_inference_data(kw.pop("draws"), scene, **kw)
    assert err.value.argument == argument
    assert isinstance(err.value, ValueError)


def test_image_moments_streaming():
    rng = np.random.default_rng(2)
    draws = rng.normal(3.0, 2.0, (50, 2, 3, 4, 5))
    m = ImageMoments()
    for lo in range(0, 50, 16):
        m.add(draws[lo:lo + 16])
    assert m.n == 50
    np.testing.assert_allclose(m.mean, draws.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, draws.std(0), rtol=1e-10)
    with pytest.raises(ArgumentError):
        m.add(np.zeros((2, 3)))
