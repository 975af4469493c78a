"""Tests of probdeblend.detection against the simulator's truth tables and analytic images."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from probdeblend import Scene
from probdeblend.detection import (
    detect,
    detect_residual,
    match_positions,
    sep_baseline,
    snr_map,
)
from probdeblend.simulate import BlendConfig, Frame, GalaxyPopulation, blend_scene

FRAME = Frame(stamp_size=64)
# bright, disk-dominated galaxies: Kron fluxes of de Vaucouleurs bulges miss > 10 %
BRIGHT = GalaxyPopulation(mag_range=(20.0, 21.0), bulge_fraction_max=0.3)


@pytest.fixture(scope="module")
def isolated():
    return blend_scene(BlendConfig(frame=FRAME, n_galaxies=(1, 1)), BRIGHT, seed=4)


@pytest.fixture(scope="module")
def pair():
    positions = np.array([[18.3, 30.6], [45.2, 34.1]])
    return blend_scene(BlendConfig(frame=FRAME, n_galaxies=(2, 2)), BRIGHT, seed=11,
                       positions=positions)


def _gaussian_scene(x0, y0, g1=0.0, g2=0.0, flux=1e5, n=48, noise_var=100.0, sigma=0.4):
    """Noiseless sheared Gaussian at 0-based (x0, y0) with a delta-like PSF."""
    scale = 0.2
    centre = (n - 1) / 2
    prof = galsim.Gaussian(sigma=sigma, flux=flux).shear(g1=g1, g2=g2)
    prof = prof.shift((x0 - centre) * scale, (y0 - centre) * scale)
    img = prof.drawImage(nx=n, ny=n, scale=scale).array
    psf = galsim.Gaussian(sigma=0.01).drawImage(nx=5, ny=5, scale=scale).array
    return Scene(img[None], np.full((1, n, n), noise_var), (psf / psf.sum())[None], ["r"], scale)


def test_pixel_convention_zero_based():
    # GalSim draws the shifted profile at a known 0-based position: sep must agree
    scene = _gaussian_scene(20.3, 15.7)
    cat = detect(scene, threshold=5)
    assert len(cat) == 1
    assert cat["x"][0] == pytest.approx(20.3, abs=0.02)
    assert cat["y"][0] == pytest.approx(15.7, abs=0.02)
    assert cat["x"].unit == "pix"


@pytest.mark.parametrize("g1, g2", [(0.3, 0.0), (-0.3, 0.0), (0.0, 0.3), (0.2, -0.2)])
def test_baseline_shape_convention(g1, g2):
    # noiseless, PSF-free, well-resolved (sigma = 5 pix) sheared Gaussian: the isophotal
    # moments recover GalSim's g up to pixelisation
    t = sep_baseline(_gaussian_scene(23.5, 23.5, g1, g2, sigma=1.0), threshold=5)
    assert len(t) == 1
    assert t["g1"][0] == pytest.approx(g1, abs=0.02)
    assert t["g2"][0] == pytest.approx(g2, abs=0.02)


def test_isolated_galaxy_one_detection(isolated):
    truth = isolated.truth
    cat = detect(isolated.to_scene(with_positions=False))
    assert len(cat) == 1
    d = np.hypot(cat["x"][0] - truth["x"][0], cat["y"][0] - truth["y"][0])
    assert d < 1.0
    assert cat["snr"][0] > 50
    assert set(f"flux_{b}" for b in isolated.bands) <= set(cat.colnames)
    assert cat["flux_r"].unit == "electron"


def test_two_separated_galaxies(pair):
    truth = pair.truth
    cat = detect(pair.to_scene(with_positions=False))
    assert len(cat) == 2
    assert np.all(np.diff(cat["snr"]) <= 0)  # sorted by decreasing S/N
    assert list(cat["id"]) == [0, 1]
    idx = match_positions(cat, np.stack([truth["x"], truth["y"]], -1), max_distance=1.5)
    assert np.all(idx >= 0) and len(set(idx)) == 2


def test_noise_only_scene_few_detections():
    rng = np.random.default_rng(0)
    var = np.full((3, 64, 64), 1600.0)
    psf = galsim.Gaussian(fwhm=0.8).drawImage(nx=21, ny=21, scale=0.2).array
    psf = np.stack([psf / psf.sum()] * 3)
    scene = Scene(rng.normal(0, 40.0, var.shape), var, psf, ["g", "r", "i"], 0.2)
    snr, mask = snr_map(scene)
    assert snr.std() == pytest.approx(1.0, abs=0.05) and not mask.any()
    cat = detect(scene, threshold=5)
    assert len(cat) <= 1
    empty = detect(Scene(np.zeros_like(var), var, psf, ["g", "r", "i"], 0.2))
    assert len(empty) == 0
    assert {"id", "x", "y", "snr", "flux_g", "flux_r", "flux_i", "a", "b", "theta"} <= set(
        empty.colnames
    )
    assert len(sep_baseline(Scene(np.zeros_like(var), var, psf, ["g", "r", "i"], 0.2))) == 0


def test_detect_residual_finds_missing_galaxy(pair):
    truth = pair.truth
    scene = pair.to_scene(with_positions=False)
    model = pair.noiseless[0]  # the model knows galaxy 0 only
    known = np.array([[truth["x"][0], truth["y"][0]]])
    new = detect_residual(scene, model, known)
    assert len(new) == 1
    assert np.hypot(new["x"][0] - truth["x"][1], new["y"][0] - truth["y"][1]) < 1.5
    # the full model leaves nothing; a known position excludes its own detection
    assert len(detect_residual(scene, pair.noiseless.sum(0), known)) == 0
    both = np.stack([truth["x"], truth["y"]], -1)
    assert len(detect_residual(scene, np.zeros_like(model), both)) == 0


def test_sep_baseline_flux_within_10_percent(isolated):
    t = sep_baseline(isolated.to_scene(with_positions=False))
    assert len(t) == 1
    assert t["flux_r"][0] == pytest.approx(isolated.truth["flux_r"][0], rel=0.10)
    assert t["flux_r"][0] < isolated.truth["flux_r"][0]  # aperture flux misses the wings
    assert 0 < t["flux_r_err"][0] < 0.05 * t["flux_r"][0]
    assert {"x", "y", "g1", "g2"} <= set(t.colnames)
    assert np.hypot(t["g1"][0], t["g2"][0]) < 1


def test_masked_pixels_ignored(isolated):
    scene = isolated.to_scene(with_positions=False)
    var = np.array(scene.variance)
    var[:, :, :8] = np.inf  # mask a strip in every band
    masked = Scene(scene.image, var, scene.psf, scene.bands, scene.pixel_scale)
    snr, mask = snr_map(masked)
    assert mask[:, :8].all() and (snr[:, :8] == 0).all()
    assert len(detect(masked)) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"min_area": 0}, "min_area"),
        ({"min_area": 2.5}, "min_area"),
        ({"deblend_nthresh": 0}, "deblend_nthresh"),
        ({"deblend_cont": 0.0}, "deblend_cont"),
        ({"deblend_cont": 2.0}, "deblend_cont"),
        ({"min_separation": -1}, "min_separation"),
    ],
)
def test_bad_arguments(isolated, kwargs, name):
    with pytest.raises(ValueError, match=name):
        detect(isolated.to_scene(), **kwargs)


def test_bad_inputs(isolated):
    scene = isolated.to_scene()
    with pytest.raises(TypeError, match="scene"):
        detect(np.zeros((6, 64, 64)))
    with pytest.raises(ValueError, match="model"):
        detect_residual(scene, np.zeros((6, 32, 32)), None)
    with pytest.raises(ValueError, match="known_positions"):
        detect_residual(scene, np.zeros(scene.image.shape), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="exclusion_radius"):
        detect_residual(scene, np.zeros(scene.image.shape), None, exclusion_radius=-1)


def test_big_endian_and_float32_inputs_accepted(isolated):
    # Scene stores float32; a big-endian model must still work with sep
    scene = isolated.to_scene(with_positions=False)
    model = np.zeros(scene.image.shape, dtype=">f8")
    assert len(detect_residual(scene, model, None, threshold=5)) == 1
