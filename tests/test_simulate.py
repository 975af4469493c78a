"""Tests of probdeblend.simulate against independent references.

* fluxes: pixel sums of large noiseless stamps vs the truth table;
* colours: GalSim's own SED / bandpass magnitudes vs the truth fluxes;
* shapes: unweighted second moments of a sheared round galaxy, PSF moments subtracted
  (for a convolution the unweighted moments add exactly), vs the applied shear;
* population: analytic distributions (counts slope, Smail n(z), Miller et al. sizes);
* layout: seeded determinism, rotated twins, blendedness limits, validation.
"""

from __future__ import annotations

import os

import galsim
import numpy as np
import pytest
from astropy.table import Table
from scipy import stats
from scipy.special import gammainc

from probdeblend import measure
from probdeblend import simulate as sim
from probdeblend.scene import Scene
from probdeblend.survey import get_survey

GRI = ("g", "r", "i")
SED_DIR = os.path.join(galsim.meta_data.share_dir, "SEDs")


def _galsim_sed(name: str) -> galsim.SED:
    return galsim.SED(os.path.join(SED_DIR, f"{name}.sed"), wave_type="Ang", flux_type="flambda")


@pytest.fixture(scope="module")
def lsst():
    return get_survey("lsst")


@pytest.fixture(scope="module")
def catalog(lsst):
    return sim.GalaxyPopulation().sample(3000, lsst, np.random.default_rng(11))


def _round_disk_row(lsst, hlr: float = 0.6, g=(0.0, 0.0)) -> Table:
    """One catalogue row: a pure exponential disk, given intrinsic shape, hlr near ``hlr``."""
    cat = sim.GalaxyPopulation(bulge_fraction_max=0.0).sample(200, lsst, np.random.default_rng(4))
    i = int(np.argmin(np.abs(cat["hlr"] - hlr)))
    row = Table(cat[i : i + 1], copy=True)
    row["g1_int"], row["g2_int"] = float(g[0]), float(g[1])
    assert row["bulge_frac"][0] == 0.0
    return row


def _psf_moments(frame: sim.Frame, n: int) -> measure.Moments:
    """Unweighted moments of the frame's Gaussian PSF drawn (with pixel response) on n x n."""
    img = galsim.Gaussian(fwhm=frame.psf_fwhm).drawImage(nx=n, ny=n, scale=frame.scale).array
    return measure.moments(img)


def _psf_corrected_g(image, psf_mom):
    m = measure.moments(image)
    return measure.shear_from_moments(m.Q11 - psf_mom.Q11, m.Q22 - psf_mom.Q22,
                                      m.Q12 - psf_mom.Q12)


# ----------------------------------------------------------------------------------------------
# population
# ----------------------------------------------------------------------------------------------
def test_population_columns_and_ranges(catalog, lsst):
    pop = sim.GalaxyPopulation()
    cols = ["mag", "z", "disk_sed", "bulge_frac", "hlr_disk", "hlr_bulge", "hlr", "g1_int",
            "g2_int"]
    for b in lsst.band_names:
        cols += [f"flux_bulge_{b}", f"flux_disk_{b}", f"flux_{b}"]
    assert catalog.colnames == cols
    assert len(catalog) == 3000
    assert np.all((catalog["mag"] >= pop.mag_range[0]) & (catalog["mag"] <= pop.mag_range[1]))
    assert np.all((catalog["z"] >= 0) & (catalog["z"] <= 3))
    assert np.all((catalog["hlr_disk"] >= pop.hlr_range[0] - 1e-12)
                  & (catalog["hlr_disk"] <= pop.hlr_range[1] + 1e-12))
    ratio = catalog["hlr_bulge"] / catalog["hlr_disk"]
    assert np.all((ratio >= 0.3) & (ratio <= 0.7))
    # composite hlr lies between the bulge and disk radii
    assert np.all(catalog["hlr"] <= catalog["hlr_disk"] * (1 + 1e-9))
    assert np.all(catalog["hlr"] >= catalog["hlr_bulge"] * (1 - 1e-9))
    assert np.all(np.hypot(catalog["g1_int"], catalog["g2_int"]) < pop.g_max)
    assert set(catalog["disk_sed"]) == {"CWW_Sbc_ext", "CWW_Scd_ext", "CWW_Im_ext"}
    for b in lsst.band_names:
        assert np.all(catalog[f"flux_{b}"] > 0)
        np.testing.assert_allclose(catalog[f"flux_{b}"],
                                   catalog[f"flux_bulge_{b}"] + catalog[f"flux_disk_{b}"])
    # the reference-band flux is the drawn magnitude
    np.testing.assert_allclose(lsst.band("r").flux_to_mag(catalog["flux_r"]), catalog["mag"],
                               atol=1e-9)


def test_population_distributions_match_their_analytic_forms(catalog):
    pop = sim.GalaxyPopulation()
    lo, hi = pop.mag_range
    # number counts dN/dm ~ 10^(0.33 m) on [lo, hi]
    a = pop.count_slope

    def cdf_m(m):
        return (10 ** (a * m) - 10 ** (a * lo)) / (10 ** (a * hi) - 10 ** (a * lo))

    assert stats.kstest(catalog["mag"], cdf_m).pvalue > 1e-3
    # bulge fraction U^2: mean 1/3
    assert np.mean(catalog["bulge_frac"]) == pytest.approx(1 / 3, abs=0.02)
    # intrinsic ellipticity: zero mean, per-component dispersion ~0.25 before truncation at 0.7
    for c in ("g1_int", "g2_int"):
        assert abs(np.mean(catalog[c])) < 0.015
        assert 0.21 < np.std(catalog[c]) < 0.25


def test_redshift_and_size_at_fixed_magnitude(lsst):
    pop = sim.GalaxyPopulation(mag_range=(23.0, 23.0 + 1e-9))
    cat = pop.sample(3000, lsst, np.random.default_rng(5))
    # p(z) ~ z^2 exp(-z/z0), z0 = 0.0417 m - 0.744 (LSST Science Book eq. 3.8): mean 3 z0
    z0 = 0.0417 * 23.0 - 0.744
    assert stats.kstest(cat["z"], lambda z: gammainc(3.0, z / z0)).pvalue > 1e-3
    assert np.mean(cat["z"]) == pytest.approx(3 * z0, rel=0.03)
    # Miller et al. (2013): ln(r_d / arcsec) = -1.145 - 0.269 (m - 23), log-normal scatter 0.3
    r_d = cat["hlr_disk"] / 1.6783469900166605  # exponential: hlr = 1.678 r_d
    inside = (cat["hlr_disk"] > pop.hlr_range[0]) & (cat["hlr_disk"] < pop.hlr_range[1])
    assert inside.mean() > 0.99
    assert np.median(np.log(r_d)) == pytest.approx(-1.145, abs=0.02)
    assert np.std(np.log(r_d[inside])) == pytest.approx(0.3, abs=0.02)


def test_population_rejects_bad_parameters():
    with pytest.raises(ValueError, match="mag_range"):
        sim.GalaxyPopulation(mag_range=(25.0, 20.0))
    with pytest.raises(ValueError, match="g_max"):
        sim.GalaxyPopulation(g_max=1.2)


# ----------------------------------------------------------------------------------------------
# photometry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("psf_fwhm", [None, 0.4], ids=["survey-psf", "gaussian-psf"])
def test_rendered_flux_equals_truth(psf_fwhm):
    frame = sim.Frame(stamp_size=128, psf_fwhm=psf_fwhm)
    res = sim.isolated_stamps(3, frame, seed=2, max_offset=3.0)
    truth = res["truth"]
    assert res["noiseless"].shape == (3, 6, 128, 128)
    assert res["noiseless"].dtype == np.float32
    sums = res["noiseless"].sum(axis=(-2, -1), dtype=np.float64)
    for j, b in enumerate(frame.band_names):
        np.testing.assert_allclose(sums[:, j], truth[f"flux_{b}"], rtol=0.01)
    # truth positions are the light centroids (0-based pixel centres)
    m = measure.moments(res["noiseless"][:, 2])
    np.testing.assert_allclose(m.x, truth["x"], atol=0.05)
    np.testing.assert_allclose(m.y, truth["y"], atol=0.05)
    assert np.any(np.abs(truth["x"] - 63.5) > 0.5)  # the offsets were applied


def test_euclid_needs_its_own_reference_band_and_renders_flux():
    frame = sim.Frame(survey="euclid", stamp_size=128)
    with pytest.raises(KeyError, match="IE"):  # the default population's reference band is r
        sim.isolated_stamps(1, frame)
    res = sim.isolated_stamps(2, frame, sim.GalaxyPopulation(ref_band="IE"), seed=3)
    np.testing.assert_allclose(res["noiseless"][:, 0].sum(axis=(-2, -1), dtype=np.float64),
                               res["truth"]["flux_IE"], rtol=0.01)
    np.testing.assert_allclose(get_survey("euclid").band("IE").flux_to_mag(
        res["truth"]["flux_IE"]), res["truth"]["mag"], atol=1e-9)


def test_render_galaxy_flux_and_offset(lsst):
    row = _round_disk_row(lsst, hlr=0.5, g=(0.2, 0.1))[0]
    frame = sim.Frame(stamp_size=96, psf_fwhm=0.6)
    band = lsst.band("i")
    img = sim.render_galaxy(row, band, frame, offset=(4.0, -2.5))
    assert img.shape == (96, 96) and img.dtype == np.float32
    assert img.sum(dtype=np.float64) == pytest.approx(row["flux_i"], rel=0.01)
    m = measure.moments(img)
    assert (float(m.x), float(m.y)) == pytest.approx((47.5 + 4.0, 47.5 - 2.5), abs=0.02)


def test_truth_fluxes_match_galsim_sed_magnitudes(lsst):
    pop = sim.GalaxyPopulation(bulge_fraction_max=0.0)
    cat = pop.sample(12, lsst, np.random.default_rng(8))
    assert np.all(cat["bulge_frac"] == 0)
    r_bp = lsst.band("r").bandpass
    for row in cat:
        sed = _galsim_sed(row["disk_sed"]).atRedshift(row["z"]).withMagnitude(row["mag"], r_bp)
        for band in lsst:
            implied = band.flux_to_mag(row[f"flux_{band.name}"])
            assert implied == pytest.approx(sed.calculateMagnitude(band.bandpass), abs=0.01)
    # bulges follow the elliptical template: check their colours on a normal catalogue
    cat = sim.GalaxyPopulation().sample(8, lsst, np.random.default_rng(9))
    e_sed = _galsim_sed("CWW_E_ext")
    for row in cat:
        s = e_sed.atRedshift(row["z"])
        for band in lsst:
            colour = band.flux_to_mag(row[f"flux_bulge_{band.name}"]) - lsst.band(
                "r").flux_to_mag(row["flux_bulge_r"])
            ref = s.calculateMagnitude(band.bandpass) - s.calculateMagnitude(r_bp)
            assert colour == pytest.approx(ref, abs=0.01)


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shear", [(0.05, -0.03), (-0.02, 0.04)])
def test_sheared_round_galaxy_recovers_the_shear(lsst, shear):
    frame = sim.Frame(stamp_size=128, psf_fwhm=0.4)
    row = _round_disk_row(lsst)
    band = lsst.band("r")
    psf_mom = _psf_moments(frame, 128)
    # the PSF-plus-pixel moments are those of a Gaussian of sigma = FWHM / 2.355 and a box
    sig2 = (0.4 / (2 * np.sqrt(2 * np.log(2))) / frame.scale) ** 2 + 1 / 12
    assert float(psf_mom.Q11) == pytest.approx(sig2, rel=1e-3)
    round_img = sim.render_galaxy(row[0], band, frame)
    g_round = _psf_corrected_g(round_img, psf_mom)
    assert np.hypot(*g_round) < 1e-4
    img = sim.render_galaxy(row[0], band, frame, shear=shear)
    g = _psf_corrected_g(img, psf_mom)
    assert np.allclose(g, shear, atol=2e-3)
    # uncorrected moments are diluted by the PSF: the correction matters at this tolerance
    assert not np.allclose(measure.moments(img).g, shear, atol=2e-3)
    # the same through blend_scene, with the catalogue and position given
    cfg = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=128, psf_fwhm=0.4), shear=shear)
    scene = sim.blend_scene(cfg, catalog=row, positions=[[63.5, 63.5]], seed=1)
    g_scene = _psf_corrected_g(scene.noiseless[0, GRI.index("r")], psf_mom)
    assert np.allclose(g_scene, shear, atol=2e-3)
    assert (scene.truth["g1"][0], scene.truth["g2"][0]) == pytest.approx(shear)


def test_truth_g_is_the_lensed_intrinsic_shape(lsst):
    frame = sim.Frame(bands=GRI, stamp_size=128, psf_fwhm=0.4)
    row = _round_disk_row(lsst, g=(0.3, -0.2))
    psf_mom = _psf_moments(frame, 128)
    for shear in [(0.0, 0.0), (0.04, 0.02)]:
        cfg = sim.BlendConfig(frame=frame, shear=shear)
        sc = sim.blend_scene(cfg, catalog=row, positions=[[63.5, 63.5]])
        g = _psf_corrected_g(sc.noiseless[0, 1], psf_mom)
        truth = (sc.truth["g1"][0], sc.truth["g2"][0])
        assert np.allclose(g, truth, atol=2e-3)
        # GalSim's composition of shears, computed independently
        ref = galsim.Shear(g1=shear[0], g2=shear[1]) + galsim.Shear(g1=0.3, g2=-0.2)
        assert truth == pytest.approx((ref.g1, ref.g2), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# determinism, noise
# ----------------------------------------------------------------------------------------------
SMALL = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=48), n_galaxies=(2, 3))


def _tables_equal(a: Table, b: Table) -> bool:
    return a.colnames == b.colnames and all(np.array_equal(a[c], b[c]) for c in a.colnames)


def test_blend_scene_is_deterministic_per_seed():
    a, b = sim.blend_scene(SMALL, seed=3), sim.blend_scene(SMALL, seed=3)
    for k in ("image", "variance", "psf", "noiseless"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert _tables_equal(a.truth, b.truth)
    assert a.truth.meta == b.truth.meta
    c = sim.blend_scene(SMALL, seed=4)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.truth["mag"][:1], c.truth["mag"][:1])


def test_isolated_stamps_are_deterministic_per_seed():
    frame = sim.Frame(bands=GRI, stamp_size=24, psf_fwhm=0.4)
    a = sim.isolated_stamps(4, frame, seed=7, noise=True)
    b = sim.isolated_stamps(4, frame, seed=7, noise=True)
    for k in ("noiseless", "image", "variance", "psf"):
        np.testing.assert_array_equal(a[k], b[k])
    assert _tables_equal(a["truth"], b["truth"])
    c = sim.isolated_stamps(4, frame, seed=8, noise=True)
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["truth"]["mag"], c["truth"]["mag"])
    assert set(a) == {"noiseless", "psf", "truth", "image", "variance"}
    assert "image" not in sim.isolated_stamps(1, frame, seed=7)


def test_noise_has_the_stated_variance():
    frame = sim.Frame(bands=GRI, stamp_size=64)
    sc = sim.blend_scene(sim.BlendConfig(frame=frame), seed=12)
    total = sc.noiseless.sum(0)
    sky = np.array([get_survey("lsst").band(b).sky_level for b in GRI])[:, None, None]
    np.testing.assert_allclose(sc.variance, sky + np.clip(total, 0, None), rtol=1e-6)
    pull = (sc.image - total) / np.sqrt(sc.variance)
    assert abs(pull.mean()) < 0.03
    assert pull.std() == pytest.approx(1.0, abs=0.03)
    # the truth SNR is sqrt(sum S^2 / (S + B)) in the r band (Arcelin et al. 2021)
    s = sc.noiseless[:, 1].astype(float)
    snr = np.sqrt((s**2 / (s + sky[1])).sum(axis=(-2, -1)))
    np.testing.assert_allclose(sc.truth["snr"], snr, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# rotated twins
# ----------------------------------------------------------------------------------------------
def test_rotated_twin_without_shear_is_the_rotated_image():
    cfg = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=64), n_galaxies=(3, 3))
    orig = sim.blend_scene(cfg, seed=5)
    twin = sim.blend_scene(cfg, seed=5, rotate90=True)
    rot = np.rot90(orig.image, k=-1, axes=(-2, -1))
    np.testing.assert_allclose(twin.image, rot, rtol=0, atol=1e-5 * np.abs(orig.image).max())
    np.testing.assert_allclose(twin.noiseless, np.rot90(orig.noiseless, k=-1, axes=(-2, -1)),
                               rtol=0, atol=1e-5 * orig.noiseless.max())
    np.testing.assert_allclose(twin.variance, np.rot90(orig.variance, k=-1, axes=(-2, -1)),
                               rtol=1e-6)
    # positions rotate by +90 deg (counter-clockwise, x towards y) about the centre:
    # (dx, dy) -> (-dy, dx)
    c = (64 - 1) / 2
    dx, dy = orig.truth["x"] - c, orig.truth["y"] - c
    np.testing.assert_allclose(twin.truth["x"], c - dy, atol=1e-12)
    np.testing.assert_allclose(twin.truth["y"], c + dx, atol=1e-12)
    # ... and the rotated image has its galaxies there (light centroids of each galaxy)
    m = measure.moments(twin.noiseless[:, 1])
    np.testing.assert_allclose(m.x, twin.truth["x"], atol=0.25)
    np.testing.assert_allclose(m.y, twin.truth["y"], atol=0.25)
    # a 90 deg rotation flips the reduced shear
    for k in ("g1_int", "g2_int", "g1", "g2"):
        np.testing.assert_allclose(twin.truth[k], -orig.truth[k], atol=1e-12)
    np.testing.assert_array_equal(twin.truth["mag"], orig.truth["mag"])
    assert twin.truth["blendedness_total"][0] == pytest.approx(
        orig.truth["blendedness_total"][0], abs=1e-5)
    assert twin.truth.meta["rotate90"] and not orig.truth.meta["rotate90"]


def test_rotated_twin_with_shear_is_not_a_rotation():
    shear = (0.03, -0.02)
    cfg = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=64), n_galaxies=(2, 2),
                          shear=shear)
    orig = sim.blend_scene(cfg, seed=6)
    twin = sim.blend_scene(cfg, seed=6, rotate90=True)
    np.testing.assert_allclose(twin.truth["g1_int"], -orig.truth["g1_int"])
    assert not np.allclose(twin.truth["g1"], -orig.truth["g1"], atol=1e-3)
    assert not np.allclose(twin.truth["g2"], -orig.truth["g2"], atol=1e-3)
    # to first order the pair average is the shear (shape noise cancels)
    mean_g1 = 0.5 * (orig.truth["g1"] + twin.truth["g1"])
    mean_g2 = 0.5 * (orig.truth["g2"] + twin.truth["g2"])
    g_int = np.hypot(orig.truth["g1_int"], orig.truth["g2_int"])
    np.testing.assert_allclose(mean_g1, shear[0], atol=0.03 * g_int.max() ** 2 + 1e-3)
    np.testing.assert_allclose(mean_g2, shear[1], atol=0.03 * g_int.max() ** 2 + 1e-3)
    rot = np.rot90(orig.noiseless, k=-1, axes=(-2, -1))
    assert np.abs(twin.noiseless - rot).max() > 1e-3 * orig.noiseless.max()


# ----------------------------------------------------------------------------------------------
# blendedness, config, truth table, Scene
# ----------------------------------------------------------------------------------------------
def test_blendedness_far_and_overlapping(catalog):
    cfg = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=80))
    pair = Table(catalog[:2], copy=True)
    pair["hlr_disk"] = [0.4, 0.4]
    pair["hlr_bulge"] = [0.2, 0.2]
    far = sim.blend_scene(cfg, catalog=pair, positions=[[12.0, 12.0], [68.0, 68.0]])
    near = sim.blend_scene(cfg, catalog=pair, positions=[[38.0, 39.5], [41.0, 39.5]])
    assert far.truth["blendedness_total"][0] < 1e-3
    assert far.truth["blendedness_closest"][0] < 1e-3
    assert near.truth["blendedness_total"][0] > 0.1
    assert near.truth["blendedness_closest"][0] == pytest.approx(
        near.truth["blendedness_total"][0])
    # only the target carries blendedness
    assert near.truth["blendedness_total"][1] == 0
    assert list(near.truth["is_target"]) == [True, False]
    np.testing.assert_allclose(near.truth["x"], [38.0, 41.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_galaxies": (0, 2)}, "n_galaxies"),
        ({"n_galaxies": (3, 2)}, "n_galaxies"),
        ({"annulus": (2.0, 1.0)}, "annulus"),
        ({"annulus": (-1.0, 1.0)}, "annulus"),
        ({"shear": (0.8, 0.8)}, "shear"),
    ],
)
def test_blend_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sim.BlendConfig(**kwargs)


def test_blend_layout_respects_the_config():
    cfg = sim.BlendConfig(frame=sim.Frame(bands=GRI, stamp_size=64), n_galaxies=(2, 3),
                          max_shift=0.2, annulus=(1.0, 2.0), psf_fwhm_range=(1.0, 1.2))
    c = (64 - 1) / 2
    counts = set()
    for seed in range(6):
        t = sim.blend_scene(cfg, seed=seed).truth
        counts.add(len(t))
        scale = cfg.frame.scale
        assert np.hypot(t["x"][0] - c, t["y"][0] - c) * scale <= 0.2 + 1e-9
        r = np.hypot(t["x"][1:] - t["x"][0], t["y"][1:] - t["y"][0]) * scale
        assert np.all((r >= 1.0 - 1e-9) & (r <= 2.0 + 1e-9))
        assert 1.0 <= t.meta["psf_fwhm_scale"] <= 1.2
    assert counts == {2, 3}


def test_truth_table_columns_and_to_scene():
    sc = sim.blend_scene(SMALL, seed=2)
    t = sc.truth
    documented = ["mag", "z", "disk_sed", "bulge_frac", "hlr_disk", "hlr_bulge", "hlr", "g1_int",
                  "g2_int", "x", "y", "g1", "g2", "snr", "is_target", "blendedness_total",
                  "blendedness_closest"]
    for b in GRI:
        documented += [f"flux_bulge_{b}", f"flux_disk_{b}", f"flux_{b}"]
    assert set(documented) <= set(t.colnames)
    assert t.meta["seed"] == 2 and t.meta["blendedness_band"] == "r"
    n = len(t)
    assert sc.noiseless.shape == (n, 3, 48, 48)
    assert sc.image.shape == sc.variance.shape == (3, 48, 48)
    assert sc.psf.shape == (3, 41, 41)
    np.testing.assert_allclose(sc.psf.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    scene = sc.to_scene()
    assert isinstance(scene, Scene)
    assert scene.bands == GRI
    assert scene.pixel_scale == pytest.approx(0.2)
    assert scene.n_sources == n
    np.testing.assert_allclose(scene.positions, np.stack([t["x"], t["y"]], -1))
    np.testing.assert_allclose(scene.image, sc.image)
    assert sc.to_scene(with_positions=False).positions is None


def test_frame_defaults_and_psf_images():
    f = sim.Frame()
    assert f.band_names == tuple("ugrizy")
    assert f.scale == pytest.approx(0.2) and f.stamp_size == 48
    psf = sim.Frame(survey="hsc", psf_size=21).psf_images()
    assert psf.shape == (5, 21, 21)
    np.testing.assert_allclose(psf.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    d = sim.Frame(bands=("r", "g")).to_dict()
    assert d["bands"] == ["r", "g"] and d["pixel_scale"] == pytest.approx(0.2)
    cfg = sim.with_shear(SMALL, 0.01, -0.02)
    assert cfg.shear == (0.01, -0.02) and cfg.frame == SMALL.frame


def test_frame_of_model_frame_draws_what_the_prior_sees():
    from probdeblend.priors import LSST_FRAME
    from probdeblend.simulate import Frame

    f = Frame.of_model_frame(LSST_FRAME)
    assert (f.survey, f.bands, f.stamp_size, f.scale, f.psf_fwhm) == (
        "lsst", tuple(LSST_FRAME.bands), LSST_FRAME.stamp_size, LSST_FRAME.pixel_scale,
        LSST_FRAME.psf_fwhm)
