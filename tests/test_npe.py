"""Neural posterior estimation (probdeblend.amortized.npe): q's marginal loss for galaxies
without a latent, the analytic bulge + disk galaxies, the aperture features, the blend
simulator and a short resumable training run (tiny prior)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probdeblend as pb
from probdeblend.amortized.analytic import (
    DEV_MIXTURE,
    EXP_MIXTURE,
    AnalyticGalaxies,
    fit_sersic_mixture,
    population_table,
)
from probdeblend.amortized.features import aperture_features, dihedral
from probdeblend.amortized.network import AmortizedEncoder
from probdeblend.amortized.npe import BlendSimulator, NPEConfig, _nll, simulator_bank, train_npe
from probdeblend.amortized.q import q_nll
from probdeblend.priors.frame import ModelFrame
from probdeblend.priors.train import build_tiny_prior


def _low_rank(loc, ls, fac):
    s = ls.exp()
    return torch.distributions.LowRankMultivariateNormal(loc, s[..., None] * fac, s**2)


def test_q_nll_and_its_marginal_match_torch():
    """q_nll is the low-rank Gaussian's density; rows without a latent use q's exact marginal
    over the groups after z (the rows and columns of those groups)."""
    torch.manual_seed(0)
    n, d, p, r = 5, 4, 9, 3
    loc, ls, fac, x = (torch.randn(n, p, dtype=torch.float64) * 0.5,
                       torch.randn(n, p, dtype=torch.float64) * 0.3,
                       torch.randn(n, p, r, dtype=torch.float64) * 0.7,
                       torch.randn(n, p, dtype=torch.float64))
    full = -_low_rank(loc, ls, fac).log_prob(x)
    torch.testing.assert_close(q_nll(x, loc, ls, fac), full)

    class M:
        latent_dim = d

    known = torch.tensor([True, False, True, False, False])
    got = _nll(M, x, loc, ls, fac, known)
    marg = -_low_rank(loc[:, d:], ls[:, d:], fac[:, d:]).log_prob(x[:, d:])
    torch.testing.assert_close(got, torch.where(known, full, marg))


def test_mixture_tables_are_the_documented_fits():
    for (n, k, rng), table in (((1, 12, (0.02, 1.5)), EXP_MIXTURE),
                               ((4, 16, (0.0005, 6.0)), DEV_MIXTURE)):
        a, v = fit_sersic_mixture(n, k, rng)
        np.testing.assert_allclose(a, table[0], atol=2e-6)
        np.testing.assert_allclose(v, table[1], rtol=1e-5, atol=2e-7)
        assert 0.98 < sum(table[0]) <= 1.0


@pytest.fixture(scope="module")
def population():
    return population_table(40, bands=("g", "r", "i"), seed=2)


def test_analytic_galaxies_match_galsim(population):
    """Model-frame stamps of the analytic population agree with GalSim's bulge + disk drawings
    (same frame PSF and pixel) to a few per cent of the flux, and carry the true shear."""
    import galsim

    n, scale, fwhm = 32, 0.2, 0.4
    ag = AnalyticGalaxies(population, n, scale, fwhm / 2.3548 / scale)
    stamps, flux, g = ag.render(torch.arange(len(ag)))
    assert stamps.shape == (40, 3, n, n) and flux.shape == (40, 3)
    np.testing.assert_allclose(flux.numpy(), population["flux_bulge"] + population["flux_disk"],
                               rtol=1e-6)
    np.testing.assert_allclose(g.numpy(), population["g_int"])
    psf = galsim.Gaussian(fwhm=fwhm)
    for i in range(0, 40, 4):
        sh = galsim.Shear(g1=float(population["g_int"][i, 0]), g2=float(population["g_int"][i, 1]))
        fb = population["flux_bulge"][i, 1] / flux[i, 1].item()
        gal = galsim.Add(
            galsim.DeVaucouleurs(half_light_radius=float(population["hlr_bulge"][i]),
                                 flux=float(fb)),
            galsim.Exponential(half_light_radius=float(population["hlr_disk"][i]),
                               flux=float(1 - fb))).shear(sh)
        ref = galsim.Convolve(gal, psf).drawImage(nx=n, ny=n, scale=scale).array
        assert np.abs(stamps[i, 1].numpy() - ref).sum() < 0.03


def test_aperture_features_are_units_free_and_symmetric():
    torch.manual_seed(1)
    img = torch.rand(3, 2, 24, 24) * 5
    sig = torch.rand(3, 2) + 0.5
    a = aperture_features(img, sig)
    assert a.shape == (3, 2 * 3)
    torch.testing.assert_close(aperture_features(img * 7.0, sig * 7.0), a)
    torch.testing.assert_close(aperture_features(dihedral(img, 5).contiguous(), sig), a,
                               rtol=1e-5, atol=1e-5)
    # brighter centre -> larger feature in every window
    bright = img.clone()
    bright[..., 11:13, 11:13] += 50
    assert (aperture_features(bright, sig) > a).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinynpe")
    card = build_tiny_prior(d, frame=ModelFrame(bands=("g", "r", "i"), stamp_size=24), epochs=1)
    prior = pb.load_prior(str(card))
    bank = simulator_bank(prior, psf_scales=[0.9, 1.2], n_flux=500, n_population=200)
    return prior, bank


def test_simulator_mixes_analytic_and_faint_targets(tiny):
    prior, bank = tiny
    cfg = NPEConfig(analytic_fraction=0.5, faint_fraction=0.5, faint_mags=6.0)
    sim = BlendSimulator(prior.decoder, prior.flow, bank, cfg)
    gen = torch.Generator().manual_seed(0)
    b = sim.sample(400, gen)
    D = prior.latent_dim
    assert b["images"].shape == (400, 3, 24, 24) and torch.isfinite(b["images"]).all()
    assert 0.35 < (~b["z_known"]).float().mean() < 0.65
    assert (b["target"][~b["z_known"], :D] == 0).all()
    # analytic targets carry the population's true shear, within the truncation |g| < 0.7
    e = b["target"][~b["z_known"], -2:]
    assert (e.norm(dim=-1) < 0.7).all() and e.abs().max() > 0.05
    # faint targets: the log flux spans ~6 mag more than the table's
    lf = b["target"][:, D + 1]
    table = np.log(bank["flux"][:, 1])
    assert lf.min() < table.min() - 2.0
    plain = BlendSimulator(prior.decoder, prior.flow, {k: v for k, v in bank.items()
                                                       if not k.startswith("pop_")},
                           NPEConfig())
    assert plain.sample(8, gen)["z_known"].all()
    with pytest.raises(ValueError, match="population"):
        BlendSimulator(prior.decoder, prior.flow, {k: v for k, v in bank.items()
                                                   if not k.startswith("pop_")},
                       NPEConfig(analytic_fraction=0.3))


def test_train_npe_resumes_and_exports(tiny, tmp_path):
    prior, bank = tiny
    cfg = NPEConfig(steps=6, batch_size=16, analytic_fraction=0.5, faint_fraction=0.1,
                    channels=(8, 16), hidden=32, rank=2, aperture=True, warmup_steps=1)
    torch.manual_seed(0)

    def model():
        return AmortizedEncoder(3, 24, prior.latent_dim, cfg.channels, cfg.hidden,
                                shape_head=True, rank=cfg.rank, aperture=True)

    sim = BlendSimulator(prior.decoder, prior.flow, bank, cfg)
    ck, ex = tmp_path / "ck.pt", tmp_path / "ex.pt"
    cfg3 = NPEConfig(**{**cfg.to_dict(), "steps": 3, "channels": cfg.channels})
    m = model()
    train_npe(m, sim, cfg3, ck, eval_every=3, bands=("g", "r", "i"), progress=False, export=ex)
    exported = torch.load(ex, weights_only=False)
    assert exported["step"] == 3 and "opt" not in exported
    hist = train_npe(model(), sim, cfg, ck, eval_every=3, bands=("g", "r", "i"),
                     progress=False, export=ex)
    assert hist["steps_done"] == 6 and [e["step"] for e in hist["eval"]] == [3, 6]
    assert np.isfinite(hist["eval"][-1]["nll"])


def test_rescaled_q_maps_marginal_widths_and_keeps_correlations():
    """calibration.q_widths: each marginal sd s of a group becomes c * s ** gamma; other groups
    and all correlations are unchanged; draws follow the new covariance."""
    from probdeblend.amortized.q import AmortizedQ

    rng = np.random.default_rng(0)
    S, P = 3, 6
    groups = {"z": 2, "log_flux": 1, "offset": 2, "e": 1}
    q = AmortizedQ(rng.normal(size=(S, P)), rng.uniform(0.05, 0.5, (S, P)),
                   rng.normal(size=(S, P, 2)) * 0.5, groups, np.zeros((S, 2)))
    r = q.rescaled({"e": (0.7, 1.2), "offset": (1.5, 1.0), "nope": (9.0, 1.0)})
    np.testing.assert_allclose(r.sd("e"), 0.7 * q.sd("e") ** 1.2)
    np.testing.assert_allclose(r.sd("offset"), 1.5 * q.sd("offset"))
    np.testing.assert_allclose(r.sd("z"), q.sd("z"))
    np.testing.assert_allclose(r.loc, q.loc)

    def corr(c):
        d = np.sqrt(np.einsum("spp->sp", c))
        return c / d[:, :, None] / d[:, None, :]

    np.testing.assert_allclose(corr(r.covariance()), corr(q.covariance()), atol=1e-12)
    d = r.sample(40000, rng)
    np.testing.assert_allclose(d["e"].std(0), r.sd("e"), rtol=0.03)


def test_q_draws_of_some_groups_follow_their_joint_marginal():
    """q.sample(groups=...) (what the catalogue draws: offset and e, no latents) has the
    groups' joint law: mean and covariance, cross-group correlations included, of the full
    q's; an unknown group is a KeyError naming the groups."""
    from probdeblend.amortized.q import AmortizedQ

    rng = np.random.default_rng(3)
    S, P = 2, 7
    groups = {"z": 3, "log_flux": 1, "offset": 2, "e": 1}
    q = AmortizedQ(rng.normal(size=(S, P)), rng.uniform(0.05, 0.5, (S, P)),
                   rng.normal(size=(S, P, 2)), groups, np.array([[5.0, 6.0], [7.0, 8.0]]))
    d = q.sample(200_000, rng, groups=("offset", "e"))
    assert set(d) == {"offset", "e", "position"} and d["e"].shape == (200_000, S, 1)
    v = np.concatenate([d["offset"], d["e"]], -1)
    sub = np.r_[4:7]
    cov = q.covariance()[:, sub][:, :, sub]
    for s in range(S):
        np.testing.assert_allclose(v[:, s].mean(0), q.loc[s, sub], atol=0.01)
        np.testing.assert_allclose(np.cov(v[:, s].T), cov[s], atol=0.01 * cov[s].max())
    # the cross-group (offset, e) correlations checked above are not negligible ones
    cross = cov[:, :2, 2] / np.sqrt(np.einsum("spp->sp", cov)[:, :2] * cov[:, 2:, 2])
    assert np.abs(cross).max() > 0.3
    np.testing.assert_allclose(d["position"], d["offset"] + q.centres)
    with pytest.raises(KeyError, match="groups are"):
        q.sample(3, rng, groups=("shear",))


def test_simulator_draws_latents_given_the_magnitude(tiny):
    """With a magnitude-conditioned prior, each decoded galaxy's latent is drawn given its
    own flux's r magnitude: the target's base mean moves with its log flux exactly as the map
    says; without the map (or with a pool) latents and fluxes are independent."""
    import copy

    from probdeblend.priors.flow import MagnitudeConditional

    prior, bank = tiny
    flow = copy.deepcopy(prior.flow)
    D = prior.latent_dim
    w = np.zeros((D, 1))
    w[0, 0] = 3.0  # the first base coordinate follows the standardised magnitude
    flow.context = MagnitudeConditional(np.zeros(D), w, 0.05 * np.eye(D), "r",
                                        (10.0, 40.0), 25.0, 2.0)
    prior_c = copy.copy(prior)
    prior_c.flow = flow
    bank_c = simulator_bank(prior_c, psf_scales=[1.0], n_flux=500, n_population=0)
    assert int(bank_c["mag_band"]) == 1 and "mag_band" not in bank
    cfg = NPEConfig(faint_fraction=0.5, faint_mags=3.0)
    gen = torch.Generator().manual_seed(1)
    b = BlendSimulator(prior.decoder, flow, bank_c, cfg).sample(256, gen)
    with torch.no_grad():
        u = flow.inverse(b["target"][:, :D])[0]  # the flow's base vector (before the map)
    mag = float(bank_c["mag_zero"]) - 2.5 * b["target"][:, D + 1] / np.log(10)
    np.testing.assert_allclose(u[:, 0].numpy(), 3.0 * (mag.numpy() - 25.0) / 2.0, atol=0.25)
    # unconditional paths: no relation
    for sim in (BlendSimulator(prior.decoder, flow, bank, cfg),            # a bank without it
                BlendSimulator(prior.decoder, flow, bank_c, NPEConfig(pool_size=64))):
        b = sim.sample(256, gen)
        with torch.no_grad():
            u = flow.inverse(b["target"][:, :D])[0]
        assert abs(np.corrcoef(u[:, 0].numpy(), b["target"][:, D + 1].numpy())[0, 1]) < 0.3
