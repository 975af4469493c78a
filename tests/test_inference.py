"""Forward model, scene model (Pyro vs NumPyro), MAP/Laplace, and simulation-based calibration.

All on a tiny prior (latent 4, 3 bands, 24-px stamps) so the suite stays fast; the shipped
priors are exercised in tests/test_fit.py.
"""

from __future__ import annotations

import galsim
import jax
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

import probdeblend as pb
from probdeblend.errors import InvalidPSFError
from probdeblend.inference import SceneProblem, find_map, laplace
from probdeblend.model import Backend, SceneSpec, scene_model
from probdeblend.priors.frame import ModelFrame
from probdeblend.priors.train import build_tiny_prior
from probdeblend.render import SceneRenderer, fft_size

SCALE = 0.2


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    card = build_tiny_prior(d, frame=ModelFrame(bands=("g", "r", "i"), stamp_size=24), epochs=1)
    return pb.load_prior(str(card))


@pytest.fixture(scope="module")
def cond_prior(tiny_prior):
    """The tiny prior with a random magnitude-conditioned map on its flow (r band, 18-26)."""
    from probdeblend.priors.flow import MagnitudeConditional

    p = _copy_prior(tiny_prior)
    rng = np.random.default_rng(7)
    tril = np.tril(0.1 * rng.normal(size=(4, 4)), -1) + np.diag([0.7, 0.9, 0.6, 0.8])
    p.flow.context = MagnitudeConditional(0.2 * rng.normal(size=4), 0.8 * rng.normal(size=(4, 2)),
                                          tril, "r", (18.0, 26.0), 22.0, 1.5)
    return p


def _copy_prior(prior):
    import copy

    from probdeblend.priors.distribution import LearnedPrior

    return LearnedPrior(copy.deepcopy(prior.encoder), copy.deepcopy(prior.decoder),
                        copy.deepcopy(prior.flow), prior.full_frame, card=prior.card)


#: ``(band index, m0)`` of the conditioned scenes: flux 2e4 -> r = 33 - 10.75 = 22.25
MAGNITUDE = (1, 33.0)


def _gaussian_psf(fwhm, size=25):
    img = galsim.Gaussian(fwhm=fwhm).drawImage(nx=size, ny=size, scale=SCALE).array
    return img / img.sum()


# ---------------------------------------------------------------------------- render
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_render_matches_galsim_gaussian_psf(backend):
    """A Gaussian galaxy in the model frame, rendered to a wider Gaussian PSF at a sub-pixel
    position, equals GalSim's direct drawing (independent reference)."""
    n, N = 48, 64
    gal = galsim.Gaussian(sigma=0.4).shear(g1=0.2, g2=-0.1)
    model_psf = galsim.Gaussian(fwhm=0.4)
    obs_psf = galsim.Gaussian(fwhm=0.85)
    stamp = galsim.Convolve(gal, model_psf).drawImage(nx=n, ny=n, scale=SCALE).array
    stamp = stamp / stamp.sum()
    x, y = 20.3, 41.7
    ref = galsim.Convolve(gal, obs_psf).drawImage(
        nx=N, ny=N, scale=SCALE, offset=(x - (N - 1) / 2, y - (N - 1) / 2)).array * 1000.0
    R = SceneRenderer(_gaussian_psf(0.85)[None], (N, N), _gaussian_psf(0.4), n)
    if backend == "torch":
        out = R(torch.tensor(stamp[None, None]), torch.tensor([[1000.0]]),
                torch.tensor([[x, y]])).numpy()[0]
    else:
        import jax.numpy as jnp

        out = np.asarray(R(jnp.asarray(stamp[None, None]), jnp.asarray([[1000.0]]),
                           jnp.asarray([[x, y]])))[0]
    assert np.abs(out - ref).max() / ref.max() < 1e-4
    assert out.sum() == pytest.approx(ref.sum(), rel=1e-4)


@pytest.mark.parametrize("N", [64, 152])
def test_render_matches_galsim_near_the_edges_for_any_image_size(N):
    """Sources near every edge are placed exactly whatever the image size: with N = 152 the
    fast FFT length of N + stamp + PSF (225) was odd, and render(), which infers the grid
    width from the real-FFT frequencies, shifted sources by up to ~0.5 px (now the grid is
    always even)."""
    from probdeblend.render import fft_size

    assert fft_size(225) == 225 and fft_size(225, even=True) == 240
    n = 48
    gal = galsim.Gaussian(sigma=0.4).shear(g1=0.2, g2=-0.1)
    model_psf = galsim.Gaussian(fwhm=0.4)
    obs_psf = galsim.Gaussian(fwhm=0.85)
    stamp = galsim.Convolve(gal, model_psf).drawImage(nx=n, ny=n, scale=SCALE).array
    stamp = stamp / stamp.sum()
    R = SceneRenderer(_gaussian_psf(0.85)[None], (N, N), _gaussian_psf(0.4), n)
    assert R.fft_shape[1] % 2 == 0
    for x, y in [(N - 4.3, 3.6), (2.2, N - 5.7), (N / 2 + 0.4, N - 2.1)]:
        ref = galsim.Convolve(gal, obs_psf).drawImage(
            nx=N, ny=N, scale=SCALE, offset=(x - (N - 1) / 2, y - (N - 1) / 2)).array * 1000.0
        out = R(torch.tensor(stamp[None, None]), torch.tensor([[1000.0]]),
                torch.tensor([[x, y]])).numpy()[0]
        assert np.abs(out - ref).max() / ref.max() < 1e-4


def test_render_kolmogorov_close_to_galsim():
    """Same with a Kolmogorov PSF: limited by the 41-px PSF image cutting the wings."""
    n, N = 48, 64
    gal = galsim.Exponential(half_light_radius=0.5).shear(g1=0.1, g2=0.2)
    obs = galsim.Kolmogorov(fwhm=0.8)
    stamp = galsim.Convolve(gal, galsim.Gaussian(fwhm=0.4)).drawImage(nx=n, ny=n,
                                                                      scale=SCALE).array
    psf = obs.drawImage(nx=41, ny=41, scale=SCALE).array
    psf /= psf.sum()
    ref = galsim.Convolve(gal, obs).drawImage(nx=N, ny=N, scale=SCALE, offset=(0.4, -0.3)).array
    R = SceneRenderer(psf[None], (N, N), _gaussian_psf(0.4, 41), n)
    out = R(torch.tensor((stamp / stamp.sum())[None, None]), torch.tensor([[stamp.sum()]]),
            torch.tensor([[(N - 1) / 2 + 0.4, (N - 1) / 2 - 0.3]])).numpy()[0]
    assert np.abs(out - ref).max() / ref.max() < 1e-2


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("g", [(0.02, 0.0), (0.0, -0.03), (0.1, 0.05)])
def test_render_shear_matches_galsim(backend, g):
    """Shearing the unsheared model-frame stamp inside the renderer equals GalSim's drawing of
    the sheared galaxy under the observed PSF: the error is < 1% of the change the shear makes
    (the model PSF is un-sheared in Fourier space; without that step the error is tens of
    percent of it)."""
    n, N = 48, 64
    gal = galsim.Exponential(half_light_radius=0.6).shear(e1=0.2, e2=-0.1)
    model_psf, obs_psf = galsim.Gaussian(fwhm=0.4), galsim.Gaussian(fwhm=0.8)
    stamp = galsim.Convolve(gal, model_psf).drawImage(nx=n, ny=n, scale=SCALE).array
    x, y = 31.2, 30.6
    off = (x - (N - 1) / 2, y - (N - 1) / 2)
    ref = galsim.Convolve(gal.shear(g1=g[0], g2=g[1]), obs_psf).drawImage(
        nx=N, ny=N, scale=SCALE, offset=off).array
    unsheared = galsim.Convolve(gal, obs_psf).drawImage(nx=N, ny=N, scale=SCALE,
                                                          offset=off).array
    R = SceneRenderer(_gaussian_psf(0.8)[None], (N, N), _gaussian_psf(0.4), n)
    args = (stamp[None, None] / stamp.sum(), [[stamp.sum()]], [[x, y]], np.asarray(g))
    if backend == "torch":
        out = R(*(torch.tensor(np.asarray(a, np.float32)) for a in args)).numpy()[0]
    else:
        out = np.asarray(R(*(jax.numpy.asarray(np.asarray(a, np.float32)) for a in args)))[0]
    signal = np.abs(unsheared - ref).max()
    assert np.abs(out - ref).max() < 0.01 * signal
    assert out.sum() == pytest.approx(ref.sum(), rel=1e-4)


def test_render_shear_gradient_and_identity():
    """g = 0 is the identity, and the shear is differentiable (finite-difference check)."""
    import jax.numpy as jnp

    R = SceneRenderer(_gaussian_psf(0.8)[None], (40, 40), _gaussian_psf(0.4), 24)
    stamp = galsim.Exponential(half_light_radius=0.5).shear(g1=0.3, g2=0.1).drawImage(
        nx=24, ny=24, scale=SCALE).array
    args = (jnp.asarray(stamp[None, None] / stamp.sum()), jnp.asarray([[100.0]]),
            jnp.asarray([[19.5, 20.2]]))
    plain = np.asarray(R(*args))
    zero = np.asarray(R(*args, shear=jnp.zeros(2)))
    assert np.abs(zero - plain).max() < 1e-5 * plain.max()

    def f(g):
        return jnp.sum(R(*args, shear=g) * jnp.asarray(plain))

    grad = np.asarray(jax.grad(f)(jnp.asarray([0.01, -0.02])))
    h = 1e-3
    fd = [(f(jnp.asarray([0.01 + h, -0.02])) - f(jnp.asarray([0.01 - h, -0.02]))) / (2 * h),
          (f(jnp.asarray([0.01, -0.02 + h])) - f(jnp.asarray([0.01, -0.02 - h]))) / (2 * h)]
    np.testing.assert_allclose(grad, np.asarray(fd), rtol=2e-2, atol=1e-3 * np.abs(fd).max())


def test_render_rejects_psf_narrower_than_model():
    with pytest.raises(InvalidPSFError, match="narrower than the prior's model PSF"):
        SceneRenderer(_gaussian_psf(0.3)[None], (32, 32), _gaussian_psf(0.5), 24, bands=["r"])


def test_fft_size():
    assert fft_size(97) == 100 and fft_size(128) == 128 and fft_size(1) == 1


# ---------------------------------------------------------------------------- model
def _scene_for(prior, n_src=2, seed=0, size=32, magnitude=None):
    """A scene drawn from the model itself (prior draws, rendered, noise)."""
    rng = np.random.default_rng(seed)
    bands = prior.bands
    psf = np.stack([_gaussian_psf(0.8)] * len(bands))
    sky = 400.0
    var = np.full((len(bands), size, size), sky, np.float32)
    pos = np.array([[size / 2 - 3, size / 2], [size / 2 + 4, size / 2 + 2]])[:n_src]
    scene = pb.Scene(np.zeros((len(bands), size, size), np.float32), var, psf, bands, SCALE,
                     positions=pos)
    backend = Backend.numpyro(prior)
    renderer = SceneRenderer.from_scene(scene, prior.frame)
    flux = np.full((n_src, len(bands)), 2e4)
    spec = SceneSpec.build(backend, scene, renderer, pos, flux, prior.latent_dim, flux_scale=0.5,
                           magnitude=magnitude)
    return scene, spec, backend, rng


@pytest.mark.parametrize("conditioned", [False, True])
def test_pyro_and_numpyro_models_agree(tiny_prior, cond_prior, conditioned):
    """The same parameters give the same log joint under Pyro (torch) and NumPyro (JAX), also
    with a magnitude-conditioned prior (whose latent moves with the r flux)."""
    import pyro
    from numpyro.infer.util import log_density

    prior, mag = (cond_prior, MAGNITUDE) if conditioned else (tiny_prior, None)
    scene, spec_np, backend_np, rng = _scene_for(prior, magnitude=mag)
    scene = scene.__class__(scene.image + rng.normal(0, 20, scene.image.shape).astype(np.float32),
                            scene.variance, scene.psf, scene.bands, SCALE,
                            positions=scene.positions)
    renderer = SceneRenderer.from_scene(scene, prior.frame)
    specs = {}
    for name, be in (("numpyro", backend_np), ("pyro", Backend.pyro(prior))):
        specs[name] = (be, SceneSpec.build(be, scene, renderer, scene.positions,
                                           np.full((2, 3), 2e4), prior.latent_dim,
                                           magnitude=mag))
    params = {"latent_base": rng.normal(size=(2, 4)), "log_flux": np.log(2e4) + rng.normal(
        0, 0.1, (2, 3)), "offset": rng.normal(0, 0.3, (2, 2))}
    be, spec = specs["numpyro"]
    lp_np = float(log_density(lambda: scene_model(be, spec), (), {},
                              {k: np.asarray(v, np.float32) for k, v in params.items()})[0])
    be, spec = specs["pyro"]
    cond = pyro.condition(lambda: scene_model(be, spec),
                          data={k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()})
    tr = pyro.poutine.trace(cond).get_trace()
    lp_pyro = float(tr.log_prob_sum())
    assert np.isfinite(lp_np)
    assert lp_pyro == pytest.approx(lp_np, rel=1e-4, abs=1e-2)
    if conditioned:  # the latent is the conditioned flow's, at each source's r magnitude
        mag_r = 33.0 - 2.5 * params["log_flux"][:, 1] / np.log(10)
        with torch.no_grad():
            ref = prior.flow(torch.tensor(params["latent_base"], dtype=torch.float32),
                             torch.tensor(mag_r, dtype=torch.float32))[0]
        np.testing.assert_allclose(tr.nodes["latent"]["value"].numpy(), ref.numpy(), atol=1e-5)


def test_flatten_order_matches_ravel_pytree(tiny_prior):
    _, spec, backend, rng = _scene_for(tiny_prior)
    prob = SceneProblem(backend, spec)
    params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in prob.template.items()}
    flat_jax = np.asarray(ravel_pytree(params)[0])
    assert np.allclose(prob.flatten(params), flat_jax)
    stacked = {k: np.stack([v, 2 * v]) for k, v in params.items()}
    assert np.allclose(prob.flatten_draws(stacked)[1], 2 * flat_jax)
    assert np.allclose(prob.unflatten(flat_jax)["log_flux"], params["log_flux"])


def test_compiled_functions_are_shared_across_scenes(tiny_prior):
    _, spec1, backend, _ = _scene_for(tiny_prior, seed=1)
    _, spec2, _, _ = _scene_for(tiny_prior, seed=2)
    p1, p2 = SceneProblem(backend, spec1), SceneProblem(backend, spec2)
    assert p1._fns is p2._fns


def test_map_and_laplace(tiny_prior):
    """MAP improves on the start; the Laplace covariance is symmetric positive definite and its
    flux variance is close to the Cramer-Rao scale for a bright source."""
    scene, spec, backend, rng = _scene_for(tiny_prior, n_src=1)
    prob = SceneProblem(backend, spec)
    init = {"latent_base": np.zeros((1, 4)), "log_flux": np.full((1, 3), np.log(1.5e4)),
            "offset": np.full((1, 2), 0.3)}
    # data: the model at a known point plus noise
    truth = {"latent_base": rng.normal(size=(1, 4)), "log_flux": np.full((1, 3), np.log(2e4)),
             "offset": np.zeros((1, 2))}
    z = prob.deterministic(prob.flatten(truth)[None])["latent"]
    model = np.asarray(prob.fn("model_image")(z, truth["log_flux"][None].astype(np.float32),
                                              np.asarray(spec.positions0)[None], spec))[0]
    image = model + rng.normal(0, 20, model.shape)
    scene2 = pb.Scene(image.astype(np.float32), scene.variance, scene.psf, scene.bands, SCALE,
                      positions=scene.positions)
    spec2 = SceneSpec.build(backend, scene2, SceneRenderer.from_scene(scene2, tiny_prior.frame),
                            scene.positions, np.full((1, 3), 2e4), 4)
    prob2 = SceneProblem(backend, spec2)
    flat_map, info = find_map(prob2, init)
    assert info["map_logp"] > float(prob2.logp(prob2.flatten(init).astype(np.float32)))
    cov = laplace(prob2, flat_map)
    assert np.allclose(cov, cov.T)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    m = prob2.unflatten(flat_map)
    assert np.all(np.abs(np.exp(m["log_flux"]) / 2e4 - 1) < 0.1)  # fluxes recovered
    assert np.all(np.abs(m["offset"]) < 0.3)


def _noisy_scene_problem(prior, rng, magnitude=None):
    """A 2-source scene of the tiny prior's own model at a random truth, with noise."""
    scene, spec, backend, _ = _scene_for(prior, n_src=2, magnitude=magnitude)
    prob = SceneProblem(backend, spec)
    truth = {"latent_base": rng.normal(size=(2, 4)), "log_flux": np.full((2, 3), np.log(2e4)),
             "offset": rng.normal(0, 0.2, (2, 2))}
    model = np.asarray(prob.fn("model_image")(
        prob.deterministic(prob.flatten(truth)[None])["latent"],
        truth["log_flux"][None].astype(np.float32),
        (np.asarray(spec.positions0) + truth["offset"])[None].astype(np.float32), spec))[0]
    image = (model + rng.normal(0, 20, model.shape)).astype(np.float32)
    scene2 = pb.Scene(image, scene.variance, scene.psf, scene.bands, SCALE,
                      positions=scene.positions)
    spec2 = SceneSpec.build(backend, scene2, SceneRenderer.from_scene(scene2, prior.frame),
                            scene.positions, np.full((2, 3), 2e4), prior.latent_dim,
                            magnitude=magnitude)
    return SceneProblem(backend, spec2), truth


@pytest.mark.parametrize("conditioned", [False, True])
def test_gauss_newton_is_jtwj_of_the_model_image(tiny_prior, cond_prior, conditioned):
    """The source-by-source Gauss-Newton Hessian equals J^T W J of the whole scene's model
    image (J by jax.jacfwd through decoder and renderer) plus -Hessian of the log prior, and
    is close to the exact Hessian at the MAP; with a magnitude-conditioned prior, J includes
    the morphology's dependence on the r flux."""
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.infer.util import log_density

    prior, mag = (cond_prior, MAGNITUDE) if conditioned else (tiny_prior, None)
    prob, truth = _noisy_scene_problem(prior, np.random.default_rng(3), mag)
    spec, be = prob.spec, prob.backend
    x = prob.flatten(truth).astype(np.float32)

    def image(flat):
        p = prob.unravel(flat)
        z = be.from_base(p["latent_base"], spec.magnitude(p["log_flux"], jnp))
        return spec.render(be.decode(z), jnp.exp(p["log_flux"]), spec.positions0 + p["offset"],
                           jnp).reshape(-1)

    def log_prior(flat):
        model = handlers.block(lambda: scene_model(be, spec), hide=["obs"])
        return log_density(model, (), {}, prob.unravel(flat))[0]

    J = np.asarray(jax.jacfwd(image)(x), np.float64)
    w = np.where(np.asarray(spec.good), 1 / np.asarray(spec.sigma, np.float64) ** 2, 0).ravel()
    ref = (J.T * w) @ J - np.asarray(jax.hessian(log_prior)(x), np.float64)
    gn = prob.gauss_newton(x)
    assert gn.shape == (prob.dim, prob.dim)
    assert np.allclose(gn, gn.T, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    assert np.allclose(gn, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    # float32 rounding is ~1e-7 of the largest entry; leaving out the flux-morphology term of
    # a conditioned prior errs by ~7e-5
    assert np.abs(gn - ref).max() < 1e-5 * np.abs(ref).max()
    if conditioned:  # the MAP comparison below does not depend on the prior's form
        return
    # at the MAP the exact Hessian differs only by the residual-curvature term
    flat_map, _ = find_map(prob, None, x0=x)
    sd_gn = np.sqrt(np.diag(laplace(prob, flat_map, hessian="gauss-newton")))
    sd_ex = np.sqrt(np.diag(laplace(prob, flat_map, hessian="exact")))
    assert np.median(np.abs(sd_gn / sd_ex - 1)) < 0.1
    with pytest.raises(pb.errors.ArgumentError, match="hessian"):
        laplace(prob, flat_map, hessian="newton")


def test_preconditioned_map_reaches_the_same_optimum_in_fewer_iterations(tiny_prior):
    prob, truth = _noisy_scene_problem(tiny_prior, np.random.default_rng(4))
    x0 = prob.flatten({**truth, "latent_base": np.zeros((2, 4)),
                       "log_flux": truth["log_flux"] - 0.3, "offset": np.zeros((2, 2))})
    plain, info_p = find_map(prob, None, x0=x0)
    pre, info_g = find_map(prob, None, x0=x0, precondition="gauss-newton")
    assert info_g["map_logp"] == pytest.approx(info_p["map_logp"], abs=0.05)
    assert info_g["map_iterations"] < info_p["map_iterations"]
    assert info_g["map_restarts"] >= 0
    with pytest.raises(pb.errors.ArgumentError, match="precondition"):
        find_map(prob, None, x0=x0, precondition="bfgs")


def test_batched_functions_match_one_at_a_time(tiny_prior):
    """logp_batch / loglike_bands (lax.map in blocks on CPU) agree with single evaluations,
    for batch sizes that do not divide the number of draws."""
    prob, truth = _noisy_scene_problem(tiny_prior, np.random.default_rng(5))
    x = prob.flatten(truth)[None] + 0.05 * np.random.default_rng(6).normal(size=(7, prob.dim))
    single = np.array([float(prob.logp(v.astype(np.float32))) for v in x])
    assert np.allclose(prob.logp_batch(x, batch=3), single, rtol=1e-5, atol=1e-2)
    det = prob.deterministic(x)
    ll = np.asarray(prob.fn("loglike_bands")(det["latent"].astype(np.float32),
                                             det["log_flux"].astype(np.float32),
                                             det["position"].astype(np.float32), prob.spec))
    assert ll.shape == (7, 3)
    ll0 = np.asarray(prob.fn("loglike_bands")(det["latent"][:1].astype(np.float32),
                                              det["log_flux"][:1].astype(np.float32),
                                              det["position"][:1].astype(np.float32),
                                              prob.spec))
    assert np.allclose(ll[:1], ll0, rtol=1e-5)


def test_simulation_based_calibration(tiny_prior):
    """SBC (Talts et al. 2018) on scenes drawn from the model itself: the rank of each true
    parameter among posterior draws is uniform when inference is exact. NUTS (NumPyro's
    kernel, dense mass adapted in 100 warm-up iterations, tree depth <= 5) on a 1-source
    scene, 24 replicates, ranks of flux_r and offset x among 49 draws; a chi-square test on 5
    bins must not reject uniformity at p < 0.001. The replicates run as one ``vmap``-ed
    compiled loop, each with its own image (a third of the time of 24 ``MCMC.run`` calls).

    Known limitation (see the issue notes): ranks of the *latent* coordinates came out U-shaped
    with these short chains (counts [7, 0, 2, 1, 14] for u0): the 49 draws are autocorrelated in
    the weakly identified latent directions. Longer chains thinned to their ESS are needed for a
    latent SBC; this test covers the quantities the deblender reports."""
    from numpyro.infer import Predictive
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import initialize_model, potential_energy
    from scipy import stats

    _, spec, backend, _ = _scene_for(tiny_prior, n_src=1, size=24)
    model = lambda spec, observe=True: scene_model(backend, spec, observe)  # noqa: E731
    n_rep, n_warm, n_draw = 24, 100, 49
    draws = Predictive(model, num_samples=n_rep)(jax.random.PRNGKey(0), spec, observe=False)
    z0 = initialize_model(jax.random.PRNGKey(1), model, model_args=(spec,)).param_info.z
    init_kernel, sample_kernel = hmc(
        potential_fn_gen=lambda s: (lambda z: potential_energy(model, (s,), {}, z)), algo="NUTS")

    def replicate(key, image):
        s = spec.with_arrays(lambda a: a)
        s.image = image
        state = init_kernel(z0, n_warm, dense_mass=True, max_tree_depth=5, model_args=(s,),
                            rng_key=key)

        def body(st, _):
            st = sample_kernel(st, model_args=(s,))
            return st, st.z

        _, zs = jax.lax.scan(body, state, None, length=n_warm + n_draw)
        return jax.tree_util.tree_map(lambda a: a[n_warm:], zs)

    keys = jax.random.split(jax.random.PRNGKey(100), n_rep)
    post = jax.jit(jax.vmap(replicate))(keys, draws["obs"])
    for name, got, truth in (("log_flux", post["log_flux"][:, :, 0, 1], draws["log_flux"][:, 0, 1]),
                             ("offset", post["offset"][:, :, 0, 0], draws["offset"][:, 0, 0])):
        ranks = (np.asarray(got) < np.asarray(truth)[:, None]).sum(1)
        counts = np.histogram(ranks, bins=5, range=(0, n_draw + 1))[0]
        p = stats.chisquare(counts).pvalue
        assert p > 1e-3, f"{name}: SBC ranks not uniform, counts {counts}, p={p:.2g}"


class _GaussianTarget:
    """A stand-in scene problem: ``logp_batch`` of N(0, scale^2 I), counting evaluations."""

    def __init__(self, scale):
        self.scale, self.evaluated = scale, 0

    def logp_batch(self, x):
        self.evaluated += len(x)
        return -0.5 * np.sum((np.asarray(x) / self.scale) ** 2, -1)


def test_laplace_psis_pilot_skips_hopeless_weights():
    """The PSIS pilot: where the Laplace proposal matches the posterior every proposal is
    weighted (k-hat < 0.7, 'laplace+psis'); where the posterior is far wider than the
    Laplace curvature the pilot's k-hat is > 1 and the remaining proposals are never
    evaluated (Laplace draws, flagged); ``compute_lp=False`` costs no further evaluation."""
    from probdeblend.inference import run_laplace

    d = 40
    good = _GaussianTarget(1.0)
    post = run_laplace(good, np.zeros(d), num_samples=200, cov=np.eye(d), n_proposals=800)
    assert post.method == "laplace+psis" and post.info["pareto_k"] < 0.7
    assert good.evaluated == 800 and post.info["n_proposals"] == 800
    bad = _GaussianTarget(3.0)
    post = run_laplace(bad, np.zeros(d), num_samples=200, cov=np.eye(d), n_proposals=800,
                       proposal="gaussian", compute_lp=False)
    assert post.info["pareto_k_pilot"] > 1.0 and post.info["n_proposals"] == 200
    assert bad.evaluated == 200 and "lp" not in post.sample_stats
    assert post.method.startswith("laplace (PSIS k-hat")
    assert post.samples["flat"].shape == (200, d)


def test_magnitude_context_follows_the_scene_units(tiny_prior, cond_prior):
    """electron: the survey's zero point and exposure; nJy: 31.4; other units: unconditional,
    with a warning; an unconditional prior: None."""
    from probdeblend.model import magnitude_context
    from probdeblend.survey import get_survey

    scene, *_ = _scene_for(cond_prior)
    r = get_survey("lsst").band("r")
    idx, m0 = magnitude_context(cond_prior, scene)
    assert idx == 1 and m0 == pytest.approx(r.zeropoint + 2.5 * np.log10(r.exposure_time))
    assert float(r.flux_to_mag(1e4)) == pytest.approx(m0 - 2.5 * np.log10(1e4))
    njy = pb.Scene(scene.image, scene.variance, scene.psf, scene.bands, SCALE, units="nJy")
    assert magnitude_context(cond_prior, njy) == (1, 31.4)
    adu = pb.Scene(scene.image, scene.variance, scene.psf, scene.bands, SCALE, units="adu")
    with pytest.warns(UserWarning, match="unconditional prior"):
        assert magnitude_context(cond_prior, adu) is None
    assert magnitude_context(tiny_prior, scene) is None
