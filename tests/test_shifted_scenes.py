"""Tests of benchmarks/shifted_scenes.py, the independent shifted-population scene generator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import galsim
import numpy as np
import pytest

import probdeblend as pb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ss():
    path = REPO / "benchmarks" / "shifted_scenes.py"
    spec = importlib.util.spec_from_file_location("shifted_scenes", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shifted_scenes", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scenes(ss):
    return {(k, s): ss.shifted_scene(k, s) for k in ss.KINDS for s in (0, 1, 2)}


def _truth_flux(sim):
    return np.stack([np.asarray(sim.truth[f"flux_{b}"]) for b in sim.bands], -1)


def test_kinds(ss):
    assert ss.KINDS == ("colours", "profiles", "sizes", "knots", "psf")
    with pytest.raises(ValueError):
        ss.shifted_scene("nope", 0)


@pytest.mark.parametrize("kind", ["colours", "profiles", "sizes", "knots", "psf"])
def test_valid_scene_and_truth(scenes, kind):
    for seed in (0, 1, 2):
        sim = scenes[kind, seed]
        scene = sim.to_scene()
        assert isinstance(scene, pb.Scene)
        assert tuple(scene.bands) == ("u", "g", "r", "i", "z", "y")
        assert sim.image.shape == sim.variance.shape == (6, 80, 80)
        assert np.all(sim.variance > 0)
        k = sim.psf.shape[-1]
        assert sim.psf.shape == (6, k, k) and k % 2 == 1
        np.testing.assert_allclose(sim.psf.sum((-2, -1)), 1.0, rtol=1e-5)
        t = sim.truth
        n = len(t)
        assert 2 <= n <= 4 and sim.noiseless.shape == (n, 6, 80, 80)
        for col in ("mag", "g1_int", "g2_int", "g1", "g2", "x", "y", "hlr", "snr", "is_target",
                    "blendedness_total", "blendedness_closest", "kind"):
            assert col in t.colnames, col
        assert list(t["is_target"]) == [True] + [False] * (n - 1)
        assert set(t["kind"]) == {kind}
        assert np.all((t["mag"] >= 20) & (t["mag"] <= 25.3))
        assert np.all(np.hypot(t["g1_int"], t["g2_int"]) < 0.7)
        np.testing.assert_array_equal(t["g1"], t["g1_int"])
        # target near the centre (sub-pixel shift), neighbours 0.5-3" from it
        assert abs(t["x"][0] - 39.5) <= 0.5 and abs(t["y"][0] - 39.5) <= 0.5
        sep = np.hypot(t["x"][1:] - t["x"][0], t["y"][1:] - t["y"][0]) * 0.2
        assert np.all((sep >= 0.5 - 1e-9) & (sep <= 3.0 + 1e-9))
        # truth fluxes = totals of the PSF-convolved galaxies (image sums, to the cut wings)
        np.testing.assert_allclose(sim.noiseless.sum((-2, -1)), _truth_flux(sim), rtol=0.02)
        f_r = pb.get_survey("LSST").band("r").mag_to_flux(np.asarray(t["mag"]))
        np.testing.assert_allclose(t["flux_r"], f_r, rtol=1e-6)
        assert np.all(t["snr"] > 0) and 0 <= t["blendedness_total"][0] < 1
        # the image is the noiseless sum plus noise of the stated variance
        z = (sim.image - sim.noiseless.sum(0)) / np.sqrt(sim.variance)
        assert abs(z.mean()) < 0.05 and 0.9 < z.std() < 1.1


def test_deterministic_and_paired(ss, scenes):
    for kind in ss.KINDS:
        a, b = scenes[kind, 1], ss.shifted_scene(kind, 1)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.noiseless, b.noiseless)
        assert all(np.array_equal(a.truth[c], b.truth[c], equal_nan=a.truth[c].dtype.kind == "f")
                   for c in a.truth.colnames)
        assert not np.array_equal(a.image, scenes[kind, 2].image)
    # the same seed gives the same layout / magnitudes in every kind (paired scenes)
    ref = scenes["colours", 0].truth
    for kind in ss.KINDS:
        t = scenes[kind, 0].truth
        np.testing.assert_array_equal(t["x"], ref["x"])
        np.testing.assert_array_equal(t["mag"], ref["mag"])


def test_shifts_are_what_they_say(scenes):
    t_base = [scenes["psf", s].truth for s in (0, 1, 2)]   # CWW colours, bulge + disk
    assert all(np.all(np.isnan(scenes["profiles", s].truth["bulge_frac"])) for s in (0, 1, 2))
    n = np.concatenate([scenes["profiles", s].truth["sersic_n"] for s in (0, 1, 2)])
    assert np.all((n >= 0.5) & (n <= 4.0))
    assert all(np.all(np.isnan(t["sersic_n"])) for t in t_base)
    assert scenes["psf", 0].truth.meta["psf_model"] == "moffat"
    assert scenes["knots", 0].truth.meta["psf_model"] == "kolmogorov"
    kf = np.concatenate([scenes["knots", s].truth["knot_frac"] for s in (0, 1, 2)])
    assert np.all((kf > 0) & (kf <= 0.2 + 1e-9))
    # knots are bluer than the disk: u/r of the knots-galaxy exceeds its smooth twin's
    for s in (0, 1, 2):
        tk, tb = scenes["knots", s].truth, scenes["sizes", s].truth
        np.testing.assert_array_less(tb["flux_u"] / tb["flux_r"], tk["flux_u"] / tk["flux_r"])


def _smooth_target_r(sim):
    """The target's smooth bulge + disk model in r (no truncation), convolved with the scene PSF."""
    t = sim.truth
    r = sim.bands.index("r")
    f = float(t["flux_r"][0])
    fb = float(t["bulge_frac"][0])
    gal = galsim.Add(galsim.DeVaucouleurs(half_light_radius=float(t["hlr_bulge"][0]), flux=f * fb),
                     galsim.Exponential(half_light_radius=float(t["hlr_disk"][0]),
                                        flux=f * (1 - fb)))
    gal = gal.shear(g1=float(t["g1_int"][0]), g2=float(t["g2_int"][0]))
    gal = gal.shift((t["x"][0] - 39.5) * 0.2, (t["y"][0] - 39.5) * 0.2)
    psf = galsim.InterpolatedImage(galsim.Image(np.asarray(sim.psf[r], float), scale=0.2))
    return galsim.Convolve(gal, psf).drawImage(nx=80, ny=80, scale=0.2,
                                               method="no_pixel").array


def test_knots_differ_from_smooth_profile(scenes):
    r = scenes["knots", 0].bands.index("r")
    diffs = []
    for s in (0, 1, 2):
        knots = scenes["knots", s].noiseless[0, r]
        # "colours" with the same seed has the same galaxies, r fluxes and PSFs, without knots
        smooth = scenes["colours", s].noiseless[0, r]
        # ... and is the smooth bulge + disk model (to truncation / PSF interpolation)
        model = _smooth_target_r(scenes["colours", s])
        assert np.linalg.norm(smooth - model) / np.linalg.norm(smooth) < 0.03
        np.testing.assert_allclose(knots.sum(), smooth.sum(), rtol=1e-3)   # flux moved, kept
        diffs.append(np.linalg.norm(knots - smooth) / np.linalg.norm(smooth))
    # knots are washed out by the PSF on compact, bulge-dominated targets (seed 1: 0.5%), and
    # visible on disks resolved by the PSF (seeds 0, 2: ~3% of the image norm)
    assert min(diffs) > 1e-3 and max(diffs) > 0.02, diffs
