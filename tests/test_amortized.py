"""Tests of probdeblend.amortized: geometry, normalisation, training, prediction, I/O.

A tiny prior (3 bands, 24-pixel stamps, latent 4) and a tiny encoder trained for a few epochs
on ~160 small simulated blends (3 bands, 32x32, Gaussian PSFs); nothing full-sized is trained.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import galsim
import numpy as np
import pytest
import torch

from probdeblend import Scene
from probdeblend.amortized import (
    DIHEDRAL_MATRICES,
    AmortizedEncoder,
    AmortizedPosterior,
    AmortizedTrainConfig,
    TrainingSet,
    centroid_features,
    cutout_input,
    dihedral,
    list_amortized,
    load_amortized,
    noise_sigma,
    psf_fwhm_pixels,
    save_amortized,
    split_scenes,
    train_amortized,
    windowed_centroid,
)
from probdeblend.dataset import write_dataset
from probdeblend.errors import (
    ChecksumMismatchError,
    PositionError,
    PriorLoadError,
    UnknownBandError,
)
from probdeblend.priors import ModelFrame, list_priors, load_prior
from probdeblend.priors.train import build_tiny_prior
from probdeblend.simulate import BlendConfig, Frame, blend_scene

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BANDS = ("g", "r", "i")
PRIOR_FRAME = ModelFrame(bands=BANDS, stamp_size=24)
SCENE_FRAME = Frame(bands=BANDS, stamp_size=32, psf_fwhm=0.7, psf_size=25)
N_SCENES = 160


def tiny_config(**kw) -> AmortizedTrainConfig:
    base = dict(
        channels=(8, 16, 16, 16),
        hidden=32,
        epochs=3,
        batch_size=32,
        lr=3e-3,
        seed=0,
        val_fraction=0.2,
        num_threads=1,
    )
    base.update(kw)
    return AmortizedTrainConfig(**base)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("priors")
    build_tiny_prior(d, name="tiny-prior", frame=PRIOR_FRAME, n_galaxies=128)
    return d


@pytest.fixture(scope="module")
def prior(prior_dir):
    return load_prior(prior_dir / "tiny-prior")


@pytest.fixture(scope="module")
def blend_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("blends") / "tiny-blends"
    cfg = BlendConfig(frame=SCENE_FRAME, n_galaxies=(1, 3), psf_fwhm_range=(0.8, 1.4))
    write_dataset(
        d, N_SCENES, kind="blend", shard_size=80, seed=3, frame=SCENE_FRAME, blend=cfg,
        progress=False,
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def data(blend_dir, prior):
    return TrainingSet.from_dataset(blend_dir, prior, progress=False)


@pytest.fixture(scope="module")
def trained(data):
    return train_amortized(data, tiny_config(), progress=False)


@pytest.fixture(scope="module")
def posterior(trained, prior):
    model, _ = trained
    card = {"name": "tiny-amortized", "prior": {"name": prior.name, "sha256": prior.card["sha256"]}}
    return AmortizedPosterior(model, prior.full_frame, card)


def make_scene(positions=((31.7, 30.2), (38.4, 27.9), (2.3, 40.6)), seed=5, bands=BANDS):
    frame = Frame(bands=bands, stamp_size=64, psf_fwhm=0.7, psf_size=25)
    cfg = BlendConfig(frame=frame, n_galaxies=(len(positions),) * 2)
    sim = blend_scene(cfg, seed=seed, positions=np.asarray(positions))
    return sim.to_scene()


# -- geometry and normalisation ------------------------------------------------------------------
@pytest.mark.parametrize("g", range(8))
def test_dihedral_moves_offsets_like_pixels(g):
    n = 9
    c = (n - 1) / 2
    img = np.zeros((2, n, n))
    x, y = 6, 1
    img[:, y, x] = 1.0
    t = dihedral(img, g)
    j, i = np.argwhere(t[0] == 1)[0]
    assert np.allclose(DIHEDRAL_MATRICES[g] @ [x - c, y - c], [i - c, j - c])
    assert np.array_equal(dihedral(torch.from_numpy(img), g).numpy(), t)


def test_dihedral_is_a_group():
    mats = {tuple(m.astype(int).ravel()) for m in DIHEDRAL_MATRICES}
    assert len(mats) == 8
    for m in DIHEDRAL_MATRICES:
        assert np.allclose(m @ m.T, np.eye(2))


def test_psf_fwhm_of_gaussian_matches_galsim():
    fwhm = np.array([0.6, 0.9, 1.2])
    psf = np.stack([galsim.Gaussian(fwhm=f).drawImage(nx=41, ny=41, scale=0.2).array for f in fwhm])
    # pixel integration adds the variance of a unit box, 1/12 px^2, to the Gaussian's
    sigma_px = fwhm / 0.2 / 2.3548
    expected = 2.3548 * np.sqrt(sigma_px**2 + 1 / 12)
    np.testing.assert_allclose(psf_fwhm_pixels(psf), expected, rtol=2e-3)
    delta = np.zeros((25, 25))
    delta[12, 12] = 1.0
    assert psf_fwhm_pixels(delta) == pytest.approx(2.3548 / np.sqrt(12), rel=1e-3)


def test_noise_sigma_ignores_masked_and_padded():
    var = np.full((2, 8, 8), 4.0)
    var[0, :2] = np.inf
    var[1, :, :4] = 100.0
    valid = np.ones_like(var)
    valid[1, :, :4] = 0
    np.testing.assert_allclose(noise_sigma(var, valid), [2.0, 2.0])
    assert np.isnan(noise_sigma(np.full((1, 4, 4), np.inf)))[0]


def test_cutout_input_is_units_free():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 3, 16, 16)).astype(np.float32) * 10
    sig = np.full((4, 3), 10.0, dtype=np.float32)
    a, b = cutout_input(img, sig), cutout_input(img * 1e3, sig * 1e3)
    assert a.shape == (4, 4, 16, 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:, :3], torch.asinh(torch.from_numpy(img / 30.0)), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert torch.all(a[:, 3] == 1)


def test_windowed_centroid_recovers_offsets():
    dx, dy = 0.7, -1.3
    blob = galsim.Gaussian(sigma=0.4).drawImage(nx=32, ny=32, scale=0.2, offset=(dx, dy)).array
    pos = windowed_centroid(torch.from_numpy(blob[None]).float(), 2.0, iters=5)
    np.testing.assert_allclose(pos[0].numpy(), [dx, dy], atol=0.02)
    assert torch.all(windowed_centroid(torch.zeros(1, 32, 32), 2.0) == 0)


@pytest.mark.parametrize("g", [1, 4, 6])
def test_centroid_features_move_with_the_cutout(g):
    img = galsim.Gaussian(sigma=0.5).drawImage(nx=24, ny=24, scale=0.2, offset=(1.1, 0.4)).array
    cut = np.stack([img, 2 * img])[None] * 100
    sig = np.ones((1, 2))
    c0 = centroid_features(cut, sig)[0].numpy()
    cg = centroid_features(np.ascontiguousarray(dihedral(cut, g)), sig)[0].numpy()
    for k in range(0, len(c0), 2):
        np.testing.assert_allclose(cg[k : k + 2], DIHEDRAL_MATRICES[g] @ c0[k : k + 2], atol=1e-4)


# -- training data -------------------------------------------------------------------------------
def test_training_set_targets(data, prior, blend_dir):
    from probdeblend.amortized.training_set import _render_model_frame
    from probdeblend.dataset import load_dataset

    assert len(data) == N_SCENES and data.image.shape == (N_SCENES, 3, 32, 32)
    assert data.z.shape == (N_SCENES, 8, prior.latent_dim)
    assert np.all(np.abs(data.offset) <= 1.01)  # max_shift 0.2" = 1 px
    _, truth, _ = load_dataset(blend_dir, keys=("psf",))
    tgt = truth[truth["is_target"]]
    tgt.sort("item")
    np.testing.assert_allclose(data.log_flux[:, 1], np.log(tgt["flux_r"]), rtol=1e-6)
    np.testing.assert_allclose(data.offset[:, 0], tgt["x"] - 15.5, atol=1e-5)
    # latent targets: the prior's encoding of the dihedral transforms of the clean target
    clean = _render_model_frame(tgt[:3], prior.full_frame)
    np.testing.assert_allclose(clean.sum((-2, -1))[:, 1], tgt["flux_r"][:3], rtol=0.05)
    for g in (0, 3, 5):
        loc, _ = prior.encode(np.ascontiguousarray(dihedral(clean, g)))
        np.testing.assert_allclose(data.z[:3, g], loc.numpy(), atol=1e-5)
    # PSF FWHM varies per scene (x U(0.8, 1.4) of 0.7")
    assert 0.8 * 3.5 * 0.98 < data.psf_fwhm.min() and data.psf_fwhm.max() < 1.4 * 3.5 * 1.03


def test_observed_targets_and_cache(blend_dir, prior, data, tmp_path):
    obs = TrainingSet.from_dataset(blend_dir, prior, z_target="observed", limit=20,
                                   progress=False, cache_dir=tmp_path)  # fmt: skip
    assert obs.z.shape == (20, 8, prior.latent_dim) and obs.z_target == "observed"
    assert len(list(tmp_path.glob("targets-*.npz"))) == 1
    again = TrainingSet.from_dataset(blend_dir, prior, z_target="observed", limit=20,
                                     progress=False, cache_dir=tmp_path)  # fmt: skip
    np.testing.assert_array_equal(obs.z, again.z)
    np.testing.assert_array_equal(obs.image, data.image[:20])


def test_training_set_reorders_bands(blend_dir, prior_dir, data):
    build_tiny_prior(prior_dir, name="tiny-ig", frame=ModelFrame(("i", "g"), stamp_size=24),
                     n_galaxies=32, flow=False)  # fmt: skip
    ts = TrainingSet.from_dataset(blend_dir, prior_dir / "tiny-ig", limit=10, progress=False)
    assert ts.bands == ("i", "g")
    np.testing.assert_array_equal(ts.image, data.image[:10][:, [2, 0]])
    np.testing.assert_array_equal(ts.log_flux, data.log_flux[:10][:, [2, 0]])
    np.testing.assert_array_equal(ts.sigma, data.sigma[:10][:, [2, 0]])


def test_training_set_rejects_wrong_bands(blend_dir, prior_dir):
    build_tiny_prior(prior_dir, name="tiny-gz", frame=ModelFrame(("g", "z"), stamp_size=24),
                     n_galaxies=32, flow=False)  # fmt: skip
    with pytest.raises(UnknownBandError, match="'z'"):
        TrainingSet.from_dataset(blend_dir, prior_dir / "tiny-gz", progress=False)


# -- training ------------------------------------------------------------------------------------
def test_training_reduces_validation_loss(trained):
    _, h = trained
    assert len(h["val_nll"]) == 3 and all(np.isfinite(h["val_nll"]))
    assert h["val_nll"][-1] < h["val_nll_init"]
    assert h["n_val"] == 32 and h["n_train"] == N_SCENES - 32


def test_split_is_disjoint_and_seeded():
    tr, va = split_scenes(100, tiny_config())
    assert len(va) == 20 and not set(tr) & set(va) and len(tr) + len(va) == 100
    tr2, va2 = split_scenes(100, tiny_config())
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_scenes(100, tiny_config(seed=1))[1])


def test_training_is_deterministic(data):
    cfg = tiny_config(epochs=1)
    a, ha = train_amortized(data, cfg, progress=False)
    b, hb = train_amortized(data, cfg, progress=False)
    c, _ = train_amortized(data, tiny_config(epochs=1, seed=1), progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ha["val_nll"] == hb["val_nll"]
    assert not torch.equal(a.heads["z"][0].weight, c.heads["z"][0].weight)


def test_resume_continues_exactly(data, tmp_path):
    cfg = tiny_config(epochs=2)
    full, hf = train_amortized(data, cfg, progress=False)
    # interrupted after the first epoch (the callback stops it), then resumed
    train_amortized(data, cfg, out_dir=tmp_path, progress=False, callback=lambda e, h: True)
    resumed, hr = train_amortized(data, cfg, out_dir=tmp_path, progress=False, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert hr["val_nll"] == hf["val_nll"]
    with pytest.raises(ValueError, match="another configuration"):
        train_amortized(data, tiny_config(epochs=3, lr=1e-2), out_dir=tmp_path, progress=False,
                        resume=True)  # fmt: skip


# -- prediction ----------------------------------------------------------------------------------
def test_predict_shapes_and_edge_padding(posterior, prior):
    scene = make_scene()
    pos = np.asarray(scene.positions)
    q = posterior.predict(scene)
    d, b = prior.latent_dim, 3
    shapes = {
        "z_loc": (3, d), "z_scale": (3, d), "log_flux_loc": (3, b), "log_flux_scale": (3, b),
        "offset_loc": (3, 2), "offset_scale": (3, 2), "positions": (3, 2),
        "cutout_centres": (3, 2),
    }  # fmt: skip
    for k, shape in shapes.items():
        assert q[k].shape == shape, k
        assert np.all(np.isfinite(q[k])), k
    for k in ("z_scale", "log_flux_scale", "offset_scale"):
        assert np.all(q[k] > 0)
    assert np.all(np.abs(q["cutout_centres"] - pos) <= 0.5)
    assert np.all(np.abs(q["positions"] - pos) < 2.0)
    np.testing.assert_allclose(q["positions"], q["cutout_centres"] + q["offset_loc"], atol=1e-6)
    # the source near the left edge: its cutout is zero-padded with weight 0 outside the image
    c = posterior.cutouts(scene)
    x0 = int(round(c["centres"][2, 0] - 15.5))
    assert x0 < 0
    assert np.all(c["valid"][2, :, :, :-x0] == 0) and np.all(c["images"][2, :, :, :-x0] == 0)
    assert np.all(c["valid"][2, :, :, -x0:] == 1)
    np.testing.assert_allclose(c["sigmas"][2], c["sigmas"][0], rtol=0.05)


def test_cutouts_match_a_padded_reference(posterior):
    """Cutouts (images, valid, noise level) equal those of a padded copy of the scene, for
    windows inside, across each edge and corner, fully masked bands and extra scene bands."""
    rng = np.random.default_rng(11)
    bands = ("u", "g", "r", "i")  # one band more than the encoder, in another order below
    img = rng.normal(size=(4, 40, 52)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=img.shape).astype(np.float32)
    var[1, 5:15, 30:45] = np.inf   # a masked patch
    var[3, :, :8] = np.inf         # a band masked along an edge
    yy, xx = np.mgrid[-12:13, -12:13]
    psf = np.exp(-(yy**2 + xx**2) / (2 * 1.5**2))
    scene = Scene(img, var, np.broadcast_to(psf / psf.sum(), (4, 25, 25)), bands, 0.2)
    pos = np.array([[20.0, 18.0], [0.2, 0.3], [51.4, 39.4], [2.0, 35.0], [49.0, 1.0],
                    [26.0, -0.4], [36.0, 10.0]])
    c = posterior.cutouts(scene, pos)
    n = posterior.stamp_size
    idx = [bands.index(b) for b in posterior.bands]
    pad = ((0, 0), (n, n), (n, n))
    img_p, var_p = np.pad(img[idx], pad), np.pad(var[idx], pad, constant_values=np.inf)
    for k, (x, y) in enumerate(pos):
        x0, y0 = (np.floor(np.array([x, y]) - (n - 1) / 2 + 0.5).astype(int) + n)
        win = (slice(None), slice(y0, y0 + n), slice(x0, x0 + n))
        ok = np.isfinite(var_p[win])
        np.testing.assert_array_equal(c["valid"][k], ok.astype(np.float32))
        np.testing.assert_array_equal(c["images"][k], np.where(ok, img_p[win], 0.0))
        for b in range(len(idx)):
            v = var_p[win][b][ok[b]]
            if v.size:
                np.testing.assert_allclose(c["sigmas"][k, b], np.sqrt(np.median(v)), rtol=1e-6)


def test_scale_equivariance(posterior):
    scene = make_scene()
    cst = 37.5
    scaled = Scene(scene.image * cst, scene.variance * cst**2, scene.psf, scene.bands,
                   scene.pixel_scale, positions=scene.positions)  # fmt: skip
    a, b = posterior.predict(scene), posterior.predict(scaled)
    np.testing.assert_allclose(b["log_flux_loc"], a["log_flux_loc"] + math.log(cst), atol=2e-4)
    for k in ("z_loc", "z_scale", "offset_loc", "offset_scale", "log_flux_scale", "positions"):
        np.testing.assert_allclose(b[k], a[k], atol=2e-4, rtol=1e-4, err_msg=k)


def test_band_selection_order_and_missing(posterior):
    scene = make_scene()
    ref = posterior.predict(scene)
    wide = make_scene(bands=("u", "g", "r", "i"))  # same seed: same galaxies, one extra band
    shuffled = wide.select_bands(["i", "u", "g", "r"])
    q = posterior.predict(shuffled)
    np.testing.assert_allclose(q["z_loc"], posterior.predict(wide)["z_loc"], atol=1e-6)
    assert q["z_loc"].shape == ref["z_loc"].shape
    with pytest.raises(UnknownBandError, match=r"\['g'\]"):
        posterior.predict(scene.select_bands(["r", "i"]))


def test_pixel_scale_and_position_errors(posterior):
    scene = make_scene()
    other = Scene(scene.image, scene.variance, scene.psf, scene.bands, 0.1)
    with pytest.raises(ValueError, match="pixel_scale"):
        posterior.predict(other, positions=[[30.0, 30.0]])
    with pytest.raises(PositionError, match="no source positions"):
        posterior.predict(scene.with_positions(None))
    with pytest.raises(PositionError, match="outside"):
        posterior.predict(scene, positions=[[30.0, 30.0], [70.0, 3.0]])
    with pytest.raises(PositionError):
        posterior.predict(scene, positions=[[np.nan, 3.0]])
    q = posterior.predict(scene, positions=np.zeros((0, 2)))
    assert q["z_loc"].shape == (0, posterior.latent_dim)


def test_predict_batch_matches_predict(posterior):
    scene = make_scene()
    c = posterior.cutouts(scene)
    q = posterior.predict(scene)
    qb = posterior.predict_batch(c["images"], c["sigmas"], c["psf_fwhm"], c["valid"],
                                 batch_size=2)  # fmt: skip
    for k, v in qb.items():
        np.testing.assert_allclose(v, q[k], atol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="cutouts must have shape"):
        posterior.predict_batch(c["images"][:, :2], c["sigmas"][:, :2], c["psf_fwhm"][:2])
    with pytest.raises(ValueError, match="sigmas"):
        posterior.predict_batch(c["images"], -c["sigmas"], c["psf_fwhm"])


# -- I/O -----------------------------------------------------------------------------------------
def _save(trained, prior, path):
    model, h = trained
    card = {
        "frame": prior.full_frame,
        "prior": {"name": prior.name, "sha256": prior.card["sha256"]},
        "training": {"history": h},
        "validation": {"val_nll": h["val_nll"][-1]},
    }
    return save_amortized(path, model, card)


def test_save_load_roundtrip(trained, prior, posterior, tmp_path):
    card_path = _save(trained, prior, tmp_path / "tiny-prior-amortized")
    card = json.loads(card_path.read_text())
    assert card["kind"] == "amortized" and card["name"] == "tiny-prior-amortized"
    assert card["prior"] == {"name": "tiny-prior", "sha256": prior.card["sha256"]}
    assert card["architecture"]["channels"] == [8, 16, 16, 16]
    loaded = load_amortized(tmp_path / "tiny-prior-amortized.json")
    assert loaded.bands == BANDS and loaded.prior_name == "tiny-prior"
    scene = make_scene()
    a, b = posterior.predict(scene), loaded.predict(scene)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert list_amortized(tmp_path) == ["tiny-prior-amortized"]
    assert list_priors(tmp_path) == []


def test_checksum_mismatch(trained, prior, tmp_path):
    _save(trained, prior, tmp_path / "m")
    w = tmp_path / "m.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        load_amortized(tmp_path / "m")


def test_load_errors(prior_dir, tmp_path):
    with pytest.raises(PriorLoadError, match="not an amortized encoder"):
        load_amortized(prior_dir / "tiny-prior")
    with pytest.raises(PriorLoadError, match="not found"):
        load_amortized(tmp_path / "nothing-here")


def test_for_prior_checks_the_prior(trained, prior, prior_dir, monkeypatch):
    monkeypatch.setenv("PROBDEBLEND_PRIORS_DIR", str(prior_dir))
    _save(trained, prior, prior_dir / "tiny-prior-amortized")
    post = AmortizedPosterior.for_prior("tiny-prior")
    assert post.name == "tiny-prior-amortized"
    assert "tiny-prior-amortized" not in list_priors()
    AmortizedPosterior.for_prior(prior)
    model, _ = trained
    card = {"frame": prior.full_frame, "prior": {"name": "tiny-prior", "sha256": "0" * 64}}
    save_amortized(prior_dir / "tiny-prior-amortized", model, card)
    with pytest.raises(PriorLoadError, match="retrain"):
        AmortizedPosterior.for_prior("tiny-prior")
    (prior_dir / "tiny-prior-amortized.json").unlink()
    (prior_dir / "tiny-prior-amortized.safetensors").unlink()


def test_encoder_rejects_bad_shapes():
    m = AmortizedEncoder(3, 16, 4, channels=(4, 8))
    with pytest.raises(ValueError, match="expected cutouts"):
        m(torch.zeros(2, 3, 24, 24), torch.ones(2, 3), torch.ones(3))
    out = m(torch.zeros(2, 3, 16, 16), torch.ones(2, 3), torch.full((3,), 4.0))
    assert out["z_loc"].shape == (2, 4) and out["log_flux_loc"].shape == (2, 3)


# -- the training script ---------------------------------------------------------------------------
def test_train_script_smoke(blend_dir, prior_dir, tmp_path, monkeypatch, capsys):
    script = REPO / "benchmarks" / "train_amortized.py"
    out = tmp_path / "tiny-prior-amortized"
    argv = [str(script), "--data", str(blend_dir), "--prior", str(prior_dir / "tiny-prior"),
            "--epochs", "1", "--out", str(out), "--threads", "1", "--channels", "4", "8",
            "--hidden", "16", "--batch-size", "64", "--workdir", str(tmp_path / "work"),
            "--no-progress"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "median |offset error|" in printed and "68% coverage" in printed
    card = json.loads(out.with_suffix(".json").read_text())
    for key in ("offset_error_median_px", "log_flux_residual_nmad", "z_residual_rms",
                "coverage68_z_mean", "coverage68_offset_x", "coverage68_log_flux"):  # fmt: skip
        assert key in card["validation"]
    assert card["performance"]["batch"] == 256
    assert card["data"]["z_target"] == "model" and "command" in card["data"]
