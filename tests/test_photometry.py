"""probdeblend.photometry: closed-form flux posteriors given the morphology, the local
templates of the catalogue against the scene renderer, per-group solves, calibration lookup."""

from __future__ import annotations

import numpy as np
import pytest

import probdeblend as pb
from probdeblend.amortized import AmortizedEncoder, AmortizedPosterior
from probdeblend.photometry import (
    Systematic,
    group_photometry,
    linear_fluxes,
    local_templates,
    systematic_of,
)
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
    return local_templates(st.numpy(), post.positions0, post.scene.unit_flux_psf,
                           post.prior.frame.psf_image(k))


def _noisy_scene(post, flux: float, seed: int):
    """The sources' local templates and an image of them, every band at ``flux``, plus the
    scene's noise: ``(templates, origins, image, variance, rng)``."""
    tmpl, origins = _local(post)
    full = _paste(tmpl, origins, post.scene.shape)
    var = np.asarray(post.scene.variance, float)
    rng = np.random.default_rng(seed)
    img = np.einsum("sb,sbyx->byx", np.full((len(tmpl), full.shape[1]), flux), full)
    return tmpl, origins, img + rng.normal(size=var.shape) * np.sqrt(var), var, rng


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


def test_batched_groups_equal_group_by_group_solves(post, monkeypatch):
    """Groups solved in one batch (same size, boxes padded with zero weight) give each group's
    own answer: means, errors and chi^2 as when every group is solved on its own."""
    tmpl, origins, img, var, rng = _noisy_scene(post, 2e4, seed=2)
    w = 1.0 / var
    # pad the scene so that no box is clipped: the three singletons share one batch
    pad = tmpl.shape[-1]
    img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    w = np.pad(w, ((0, 0), (pad, pad), (pad, pad)))
    origins = origins + pad
    import probdeblend.photometry as phot

    sizes = []
    solve = phot.linear_fluxes

    def spy(tm, *args, **kw):
        sizes.append(tm.shape[0])
        return solve(tm, *args, **kw)

    monkeypatch.setattr(phot, "linear_fluxes", spy)
    both = group_photometry(tmpl, origins, img, w, [[0], [1], [2]], 50, rng,
                            Systematic(0.02), redistribute=0.003)
    assert sizes == [3]
    for s in range(3):  # one group per call: no batch
        one = group_photometry(tmpl, origins, img, w, [[s]], 50, rng, Systematic(0.02),
                               redistribute=0.003)
        for key in ("mean", "sd", "chi2"):
            np.testing.assert_allclose(both[key][s], one[key][s], rtol=1e-9)
        assert np.all(np.isfinite(both["flux"][s]))
    # a source in no group, or in a group whose boxes lie outside the image: NaN, not garbage
    far = origins.copy()
    far[2] = (10_000, 10_000)
    out = group_photometry(tmpl, far, img, w, [[0, 1], [2]], 5, rng)
    assert np.all(np.isnan(out["mean"][2])) and np.all(np.isfinite(out["mean"][:2]))


def test_systematic_lookup():
    cal = {"calibration": {"flux_sys": 0.07, "power": 0.6, "n_morph": 8,
                           "by_n_morph": {"1": {"flux_sys": 0.11, "power": 0.5}}}}
    cal["calibration"]["by_n_morph"]["1"]["df"] = 4
    assert systematic_of(cal, 8) == Systematic(0.07, 0.6, np.inf)
    assert systematic_of(cal, 1) == Systematic(0.11, 0.5, 4.0)
    assert systematic_of(cal, 4) == Systematic(0.11, 0.5, 4.0)  # nearest (ties: fewer draws)
    assert systematic_of({"calibration": {"flux_sys": 0.05}}, 3) == Systematic(0.05)
    assert systematic_of(None, 8) == Systematic() == systematic_of({}, 1)
    cal["calibration"]["by_n_morph"]["1"].update(stat_scale=1.5, tail="total")
    assert systematic_of(cal, 1) == Systematic(0.11, 0.5, 4.0, 1.5, "total")
    assert systematic_of(cal, 8).tail == "systematic"  # older entries keep their meaning


@pytest.mark.parametrize("bad", [Systematic(-0.1), Systematic(df=0.0), Systematic(stat_scale=0),
                                 Systematic(tail="all"), Systematic(flux_sys=np.nan)])
def test_systematic_out_of_range_is_an_argument_error(bad):
    from probdeblend.errors import ArgumentError
    from probdeblend.photometry import flux_draws

    with pytest.raises(ArgumentError, match="Systematic"):
        bad.check()
    with pytest.raises(ArgumentError):
        flux_draws(np.ones((1, 1, 1)), np.ones((1, 1, 1, 1)), np.ones((1, 1)), 5,
                   np.random.default_rng(0), *bad)


def test_total_tail_scales_statistical_and_systematic_errors_together():
    """tail="total": per source and draw one chi^2 scale on its whole error (every band), so
    the marginals are Student-t of scale sqrt((stat_scale * sd)^2 + (flux_sys * f)^2) and the
    colours stay as sharp as the statistical errors make them."""
    from scipy import stats

    from probdeblend.photometry import flux_draws

    mean = np.array([[[1e4, 2e4], [3e4, 5e3]]])  # (M=1, B=2, S=2)
    sd = np.array([[300.0, 500.0], [400.0, 200.0]])  # (B, S)
    cov = np.zeros((1, 2, 2, 2))
    cov[0, :, 0, 0], cov[0, :, 1, 1] = sd[:, 0] ** 2, sd[:, 1] ** 2
    chi2 = np.ones((2, 2))
    rng = np.random.default_rng(1)
    n, df, k, eps = 400_000, 3.0, 1.5, 0.04
    f = flux_draws(mean, cov, chi2, n, rng, eps, 0.0, df, k, "total")["flux"]  # (n, S, B)
    for s in range(2):
        for b in range(2):
            scale = np.hypot(k * sd[b, s], eps * mean[0, b, s])
            z = (f[:, s, b] - mean[0, b, s]) / scale
            qs = np.quantile(z, [0.025, 0.16, 0.84, 0.975])
            np.testing.assert_allclose(qs, stats.t(df).ppf([0.025, 0.16, 0.84, 0.975]),
                                       rtol=0.02)
    # one scale per source: the two bands' standardised errors share their tail
    z0 = (f[:, 0, 0] - 1e4) / np.hypot(k * 300, eps * 1e4)
    z1 = (f[:, 0, 1] - 3e4) / np.hypot(k * 400, eps * 3e4)
    big = np.abs(z0) > 5
    assert np.mean(np.abs(z1[big]) > 2) > 5 * np.mean(np.abs(z1) > 2)
    # ...but not across sources (each galaxy's morphology fails on its own)
    z2 = (f[:, 1, 0] - 2e4) / np.hypot(k * 500, eps * 2e4)
    assert np.mean(np.abs(z2[big]) > 2) < 1.5 * np.mean(np.abs(z2) > 2)


def test_perturb_gives_the_models_student_t_on_gaussian_draws():
    """Systematic.perturb on draws that carry the statistical errors (the Laplace path):
    with tail "total" the result is Student-t of the model's scale, grown with each source's
    blendedness and footprint chi^2, one tail per source shared by its bands; "systematic"
    scales each draw's fluxes by one factor for all bands."""
    from scipy import stats

    rng = np.random.default_rng(4)
    n = 300_000
    mean = np.array([[1e4, 3e4], [2e4, 5e3]])  # (S, B)
    sd = np.array([[300.0, 400.0], [500.0, 200.0]])
    draws = mean + sd * rng.standard_normal((n, 2, 2))
    beta, chi2 = np.array([0.0, 0.5]), np.array([[1.0, 1.0], [2.0, 0.5]])
    model = Systematic(0.02, 1.0, 3.0, 1.0, "total", flux_sys_blend=0.1, stat_blend=2.0)
    f = model.perturb(draws, rng, beta, chi2)
    assert f.shape == draws.shape
    zs = []
    for s in range(2):
        for b in range(2):
            scale = model.scale(sd[s, b], mean[s, b], max(chi2[s, b], 1.0), beta[s])
            zs.append((f[:, s, b] - mean[s, b]) / scale)
            np.testing.assert_allclose(np.quantile(zs[-1], [0.025, 0.16, 0.84, 0.975]),
                                       stats.t(3.0).ppf([0.025, 0.16, 0.84, 0.975]), rtol=0.03)
    big = np.abs(zs[0]) > 5  # source 0's bands share their tail, source 1's do not follow
    assert np.mean(np.abs(zs[1][big]) > 2) > 4 * np.mean(np.abs(zs[1]) > 2)
    assert np.mean(np.abs(zs[2][big]) > 2) < 1.5 * np.mean(np.abs(zs[2]) > 2)
    g = Systematic(0.1, power=0.0, df=np.inf).perturb(draws, rng)
    ratio = g / draws
    np.testing.assert_allclose(ratio[..., 0], ratio[..., 1], rtol=1e-12)
    np.testing.assert_allclose(ratio[..., 0].std(), 0.1, rtol=0.02)
    assert Systematic().is_identity and Systematic(df=3.0).is_identity
    assert not Systematic(df=3.0, tail="total").is_identity
    assert not Systematic(flux_sys_blend=0.1).is_identity
    assert Systematic.from_card({**model._asdict(), "df": 3}) == model
    assert Systematic.from_card({"flux_sys": 0.05, "df": None}) == Systematic(0.05)


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


def _gauss(shape, centre, sigma):
    y, x = np.indices(shape, dtype=float)
    g = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def test_redistribution_recovers_flux_missed_by_a_compact_template():
    """A template narrower than the galaxy biases the least-squares flux low; giving each
    source its share of the residual (flux conservation) recovers it, jointly for two blended
    sources, and leaves an exact template's flux unchanged on noiseless data."""
    shape, b = (48, 48), 2
    true = np.stack([_gauss(shape, (18, 24), 3.5), _gauss(shape, (30, 24), 3.5)])  # S, y, x
    tmpl = np.stack([_gauss(shape, (18, 24), 2.5), _gauss(shape, (30, 24), 2.5)])
    f_true = np.array([1e4, 5e3])
    img = np.einsum("s,syx->yx", f_true, true)[None].repeat(b, 0)
    w = np.ones((b,) + shape)
    t = tmpl[None, :, None].repeat(b, 2)  # (M=1, S, B, y, x)
    ls, _, _ = linear_fluxes(t, img, w)
    rd, _, _ = linear_fluxes(t, img, w, redistribute=0.003)
    err_ls, err_rd = np.abs(ls[0, 0] / f_true - 1), np.abs(rd[0, 0] / f_true - 1)
    assert np.all(ls[0, 0] < 0.93 * f_true)  # the compact template loses > 7 %
    # the footprint (template above 0.3 % of its peak, r < 8.5 px) holds 95 % of the light
    assert np.all(err_rd < 0.06) and np.all(err_rd < 0.6 * err_ls)
    exact = true[None, :, None].repeat(b, 2)
    ls_e, _, _ = linear_fluxes(exact, img, w)
    rd_e, _, _ = linear_fluxes(exact, img, w, redistribute=0.003)
    np.testing.assert_allclose(rd_e, ls_e, rtol=1e-9)


def test_redistribution_covariance_matches_monte_carlo():
    """The corrected fluxes are linear in the data for fixed sharing ratios; their stated
    covariance is what repeated noise gives (ratios from the noiseless fit)."""
    shape = (32, 32)
    true = np.stack([_gauss(shape, (13, 16), 3.0), _gauss(shape, (19, 16), 3.0)])
    tmpl = np.stack([_gauss(shape, (13, 16), 2.2), _gauss(shape, (19, 16), 2.2)])[None, :, None]
    f_true = np.array([2e4, 1e4])
    clean = np.einsum("s,syx->yx", f_true, true)[None]
    var = np.full((1,) + shape, 25.0)
    w = 1.0 / var
    _, cov, _ = linear_fluxes(tmpl, clean, w, redistribute=0.003)
    rng = np.random.default_rng(3)
    draws = np.array([linear_fluxes(tmpl, clean + 5.0 * rng.standard_normal(clean.shape), w,
                                    redistribute=0.003)[0][0, 0] for _ in range(400)])
    np.testing.assert_allclose(draws.std(0), np.sqrt(np.diag(cov[0, 0])), rtol=0.15)
    np.testing.assert_allclose(np.corrcoef(draws.T)[0, 1],
                               cov[0, 0, 0, 1] / np.sqrt(cov[0, 0, 0, 0] * cov[0, 0, 1, 1]),
                               atol=0.15)


def test_photometry_redistributes_q_morphologies_only(post):
    ph = post.photometry(50, n_morph=2)
    assert ph["redistribute"] == pytest.approx(0.003)
    assert post.photometry(50, n_morph=2, redistribute=None)["redistribute"] is None
    for bad in ("yes", -0.1, 1.5):
        with pytest.raises(pb.errors.ArgumentError, match="redistribute"):
            post.photometry(50, redistribute=bad)


def test_coincident_sources_do_not_break_the_flux_draws():
    """Two sources at the same position (the encoder can move two close detections onto one
    spot) have the same template: the split of their flux is unconstrained and rounding
    leaves the redistributed covariance slightly indefinite. The draws must still come, with
    the pair's total flux as well measured as one source's."""
    from probdeblend.photometry import REDISTRIBUTE, flux_draws, psd_factor

    rng = np.random.default_rng(0)
    y, x = np.mgrid[:32, :32]
    g = np.exp(-((x - 15.3) ** 2 + (y - 16.1) ** 2) / (2 * 2.0**2))
    g2 = np.exp(-((x - 22.0) ** 2 + (y - 9.0) ** 2) / (2 * 1.5**2))
    t = np.stack([g, g, g2]) / np.stack([g, g, g2]).sum((1, 2), keepdims=True)
    tmpl = t[None, :, None]  # (M=1, S=3, B=1, y, x): sources 0 and 1 coincide
    truth = np.array([3000.0, 2000.0, 4000.0])
    image = np.einsum("s,syx->yx", truth, t)[None] + rng.normal(0, 1.0, (1, 32, 32))
    weight = np.ones((1, 32, 32))
    mean, cov, chi2 = linear_fluxes(tmpl, image, weight, REDISTRIBUTE)
    d = flux_draws(mean, cov, chi2, 2000, rng)
    assert np.all(np.isfinite(d["flux"]))
    pair = d["flux"][:, 0, 0] + d["flux"][:, 1, 0]
    assert abs(np.median(pair) - 5000.0) < 4 * pair.std() + 1.0
    assert pair.std() < 0.1 * 5000.0  # the total is measured; the split is not
    assert abs(np.median(d["flux"][:, 2, 0]) - 4000.0) < 50.0
    # the benchmark's case (family b scene 74): rounding left an eigenvalue of -0.13 next to
    # 5e5, and numpy's Cholesky refused the matrix
    v = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    bad = (v * np.array([-0.13, 1.6e5, 4.9e5])) @ v.T
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(bad)
    f = psd_factor(bad[None, None])
    np.testing.assert_allclose(f @ np.swapaxes(f, -1, -2),
                               ((v * np.array([0.0, 1.6e5, 4.9e5])) @ v.T)[None, None],
                               atol=1e-6 * 4.9e5)
    d = flux_draws(np.full((1, 1, 3), 1e3), bad[None, None], np.ones((3, 1)), 4000, rng)
    np.testing.assert_allclose(np.cov(d["flux"][:, :, 0].T), f[0, 0] @ f[0, 0].T,
                               atol=0.1 * 4.9e5)


def test_groups_are_solved_on_their_templates_support(post, monkeypatch):
    """Each group is solved on the pixels where its templates exceed 1e-4 of their peak:
    the box found is that support, and the fluxes equal those of the whole box to a few
    per cent of their errors."""
    import probdeblend.photometry as phot

    yy, xx = np.mgrid[:40, :40]
    blob = np.exp(-((xx - 12.0) ** 2 + (yy - 20.0) ** 2) / (2 * 2.0**2))
    t = np.stack([np.stack([blob, 0.5 * blob]), np.zeros((2, 40, 40))])
    lo, hi = phot._support(t, 1e-4)
    above = np.argwhere(blob > 1e-4)  # (y, x) pixels of the support
    assert tuple(lo[0]) == (above[:, 1].min(), above[:, 0].min())
    assert tuple(hi[0]) == (above[:, 1].max() + 1, above[:, 0].max() + 1)
    assert tuple(lo[1]) == (0, 0) and tuple(hi[1]) == (40, 40)  # no signal: the whole box

    tmpl, origins, img, var, rng = _noisy_scene(post, 3e4, seed=4)
    cut = group_photometry(tmpl, origins, img, 1.0 / var, [np.arange(3)], 10, rng,
                           redistribute=0.003)
    monkeypatch.setattr(phot, "_SUPPORT", 0.0)  # every pixel of the boxes
    whole = group_photometry(tmpl, origins, img, 1.0 / var, [np.arange(3)], 10, rng,
                             redistribute=0.003)
    assert np.all(np.abs(cut["mean"] - whole["mean"]) < 0.05 * whole["sd"])
    np.testing.assert_allclose(cut["sd"], whole["sd"], rtol=0.01)


def test_variance_instead_of_weight_gives_the_same_fluxes(post):
    """``variance=`` (inverted box by box, no image-size weight) solves exactly what
    ``weight = 1 / variance`` does, masked pixels (variance inf) included; neither: an
    ArgumentError."""
    from probdeblend.errors import ArgumentError

    tmpl, origins, img, var, rng = _noisy_scene(post, 2e4, seed=5)
    var = var.copy()
    var[:, 30:34, 20:60] = np.inf  # a masked strip across the sources
    w = np.where(np.isfinite(var), 1.0 / var, 0.0)
    a = group_photometry(tmpl, origins, img, w, [np.arange(3)], 10,
                         np.random.default_rng(0), redistribute=0.003)
    b = group_photometry(tmpl, origins, img.astype(np.float32), None, [np.arange(3)], 10,
                         np.random.default_rng(0), redistribute=0.003,
                         variance=var.astype(np.float32))
    for key in ("mean", "sd", "chi2", "blendedness"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-8)
    with pytest.raises(ArgumentError, match="weight"):
        group_photometry(tmpl, origins, img, None, [np.arange(3)], 10, rng)


def test_snr_power_scales_the_systematic_with_the_band_summed_snr():
    """Systematic(snr_power=g): the fractional systematic is flux_sys * (nu / SNR_REF) ** g,
    nu the S/N of the band-summed flux, the same in flux_draws (closed-form errors) and in
    perturb (draws that carry them); it needs the S/N."""
    from probdeblend.photometry import SNR_REF, flux_draws

    rng = np.random.default_rng(6)
    mean = np.array([[[1e4, 1e5], [1e4, 1e5]]])  # (M=1, B=2, S=2): S/N 50 and 500 summed
    sd_b = np.array([2e4, 2e5]) / 50.0 / np.sqrt(2.0)  # per band: summed S/N 50 and 50
    sd_b[1] /= 10.0  # source 1: summed S/N 500
    cov = np.zeros((1, 2, 2, 2))
    cov[0, :, 0, 0], cov[0, :, 1, 1] = sd_b[0] ** 2, sd_b[1] ** 2
    model = Systematic(0.02, power=0.0, snr_power=0.5)
    f = flux_draws(mean, cov, np.ones((2, 2)), 200_000, rng, *model)["flux"]  # (n, S, B)
    for s, nu in ((0, 50.0), (1, 500.0)):
        want = np.hypot(sd_b[s], 0.02 * (nu / SNR_REF) ** 0.5 * mean[0, 0, s])
        np.testing.assert_allclose(f[:, s, 0].std(), want, rtol=0.02)
    draws = mean[0].T + sd_b[:, None] * rng.standard_normal((200_000, 2, 2))
    g = model.perturb(draws, rng)
    np.testing.assert_allclose(g.std(0), f.std(0), rtol=0.03)
    with pytest.raises(ValueError, match="S/N"):
        model.factors(np.zeros(2))
