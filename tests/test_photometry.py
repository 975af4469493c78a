"""probdeblend.photometry: closed-form flux posteriors given the morphology, the local
templates of the catalogue against the scene renderer, per-group solves, calibration lookup."""

from __future__ import annotations

import numpy as np
import pytest

import probdeblend as pb
from probdeblend.amortized import AmortizedEncoder, AmortizedPosterior
from probdeblend.photometry import group_photometry, linear_fluxes, local_templates, systematic_of
from probdeblend.priors.frame import ModelFrame
from probdeblend.priors.train import build_tiny_prior
from probdeblend.scene_posterior import PriorCache, ScenePosterior
from probdeblend.simulate import BlendConfig, Frame, blend_scene


@pytest.fixture(scope="module")
def post(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("tinyphot")
    prior = pb.load_prior(str(build_tiny_prior(
        d, frame=ModelFrame(bands=("g", "r", "i"), stamp_size=24), epochs=1)))
    torch.manual_seed(0)
    net = AmortizedEncoder(3, 24, prior.latent_dim, channels=(8, 16), hidden=32,
                           shape_head=True, rank=2)
    enc = AmortizedPosterior(net, prior.frame, {"name": "tiny-amortized"})
    cfg = BlendConfig(frame=Frame(bands=("g", "r", "i"), stamp_size=48), n_galaxies=(3, 3),
                      annulus=(1.0, 2.0))
    scene = blend_scene(cfg, seed=5).to_scene()
    return ScenePosterior(scene, prior, encoder=enc, cache=PriorCache())


def _paste(tmpl, origins, shape):
    out = np.zeros((len(tmpl), tmpl.shape[1]) + tuple(shape))
    size = tmpl.shape[-1]
    for j, (ox, oy) in enumerate(origins):
        ax, ay, bx, by = max(ox, 0), max(oy, 0), min(ox + size, shape[1]), min(oy + size, shape[0])
        out[j, :, ay:by, ax:bx] = tmpl[j, :, ay - oy:by - oy, ax - ox:bx - ox]
    return out


def _local(post):
    """Local templates of every source at q's mean (the catalogue's rendering)."""
    import torch

    with torch.inference_mode():
        st = post.prior.decode(torch.as_tensor(np.asarray(post.q.mean("z"), np.float32)))
    k = post.scene.psf.shape[-1]
    return local_templates(st.numpy(), post.positions0, post.scene.psf,
                           post.prior.frame.psf_image(k))


def test_local_templates_equal_scene_renderer(post):
    """The catalogue's per-source boxes render what the scene renderer renders."""
    full = post.flux_templates(post.q.mean("z")[None], post.positions0[None])[0]  # S,B,y,x
    tmpl, origins = _local(post)
    local = _paste(tmpl, origins, post.scene.shape)
    np.testing.assert_allclose(local, full, atol=2e-3 * full.max())
    # unit flux: what falls in the scene sums to <= 1, and nearly all of it for central sources
    assert np.all(local.sum((-2, -1)) < 1.01) and np.all(local.sum((-2, -1)) > 0.8)


def test_group_solve_equals_scene_solve(post):
    """Solving each blend group in its own box gives the scene-wide joint solution, and on an
    image made of the templates the fluxes come back within their errors."""
    tmpl, origins = _local(post)
    full = _paste(tmpl, origins, post.scene.shape)
    f_true = np.array([[3e4, 5e4, 4e4], [8e3, 1.2e4, 1e4], [2e4, 2e4, 2e4]])
    var = np.asarray(post.scene.variance, float)
    rng = np.random.default_rng(1)
    img = np.einsum("sb,sbyx->byx", f_true, full) + rng.normal(size=var.shape) * np.sqrt(var)
    w = 1.0 / var
    mean, cov, _ = linear_fluxes(full[None], img, w)
    ph = group_photometry(tmpl, origins, img, w, [np.arange(3)], 4000, rng)
    np.testing.assert_allclose(ph["mean"], mean[0].T, rtol=1e-6)
    sd = np.sqrt(np.einsum("bss->bs", cov[0])).T
    np.testing.assert_allclose(ph["flux"].std(1), sd, rtol=0.1)
    assert np.all(np.abs(ph["mean"] - f_true) < 4 * sd)
    # each source alone: a different (unblended) answer, larger errors where they overlap
    alone = group_photometry(tmpl, origins, img, w, [[0], [1], [2]], 10, rng)
    assert not np.allclose(alone["mean"], ph["mean"], rtol=1e-3)


def test_systematic_lookup():
    cal = {"calibration": {"flux_sys": 0.07, "power": 0.6, "n_morph": 8,
                           "by_n_morph": {"1": {"flux_sys": 0.11, "power": 0.5}}}}
    cal["calibration"]["by_n_morph"]["1"]["df"] = 4
    assert systematic_of(cal, 8) == (0.07, 0.6, np.inf)
    assert systematic_of(cal, 1) == (0.11, 0.5, 4.0)
    assert systematic_of(cal, 4) == (0.11, 0.5, 4.0)  # nearest calibrated n_morph (ties: fewer)
    assert systematic_of({"calibration": {"flux_sys": 0.05}}, 3) == (0.05, 1.0, np.inf)
    assert systematic_of(None, 8) == (0.0, 1.0, np.inf) == systematic_of({}, 1)


def test_systematic_is_shared_by_bands_and_heavy_tailed():
    """The morphology systematic moves all bands of a source together (colours stay sharp)
    and has Student-t tails; its scale follows flux_sys * flux * inflation ** (power / 2)."""
    from probdeblend.photometry import flux_draws

    mean = np.array([[[1e4], [3e4]]])  # (M=1, B=2, S=1)
    cov = np.full((1, 2, 1, 1), 1e-6)  # negligible statistical error
    chi2 = np.array([[4.0, 4.0]])  # (S, B)
    rng = np.random.default_rng(0)
    d = flux_draws(mean, cov, chi2, 200_000, rng, flux_sys=0.1, power=0.5, df=np.inf)
    f = d["flux"][:, 0]  # (n, B)
    rel = f / mean[0, :, 0] - 1
    np.testing.assert_allclose(rel[:, 0], rel[:, 1], atol=1e-6)  # one error for all bands
    np.testing.assert_allclose(rel[:, 0].std(), 0.1 * 4**0.25, rtol=0.02)
    t = flux_draws(mean, cov, chi2, 200_000, rng, flux_sys=0.1, power=0.5, df=3.0)["flux"]
    z = np.abs(t[:, 0, 0] / 1e4 - 1) / (0.1 * 4**0.25)
    assert np.mean(z > 3) > 5 * np.mean(np.abs(rel[:, 0]) / (0.1 * 4**0.25) > 3)
