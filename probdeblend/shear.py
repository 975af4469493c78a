"""Posterior of a constant shear (g1, g2) shared by an ensemble of galaxies, and m, c biases.

Hierarchical inference from per-galaxy ellipticity posteriors (Schneider et al. 2015): each
galaxy's posterior draws ``e_ij`` were obtained under an *interim prior* ``p_I(e)``; for a
constant reduced shear ``g`` the intrinsic ellipticity is

    e_int = (e - g) / (1 - conj(g) e)            (complex notation, GalSim reduced shear)

(the inverse of ``e = (e_int + g) / (1 + conj(g) e_int)``, Seitz & Schneider 1997), and the
population of intrinsic shapes is taken to be the interim prior itself. The likelihood of the
ensemble is then estimated by importance sampling over the draws:

    log L(g) = sum_i log mean_j [ p_I(e_int(e_ij, g)) |d e_int / d e| / p_I(e_ij) ]

with ``|d e_int / d e| = (1 - |g|^2)^2 / |1 - conj(g) e|^4``. ``p_I`` is an isotropic Gaussian in
(e1, e2) of dispersion ``sigma_e`` truncated at ``|e| < 1``; :func:`interim_sigma` estimates
``sigma_e`` from the learned prior's own ellipticity distribution (decoded prior samples measured
with :func:`probdeblend.measure.psf_corrected_shape`), so the interim prior is the one the
deblender's posteriors actually carry. Conventions: see :mod:`probdeblend.measure`.

:func:`infer_forward` is the full-forward-model variant for small ensembles: the shear is a
sample site of a joint model of all scenes, applied to every decoded (intrinsic) galaxy inside
the renderer (:func:`probdeblend.render.shear_stamps`), so no shape estimator is involved.

Shear calibration follows Arcelin et al. 2021 (eqs. 8-9): ``e_obs = (1 + m) g_true + c`` per
component, measured with pairs of sheared copies; :func:`multiplicative_bias` fits it.
"""

from __future__ import annotations

import numpy as np

from .errors import ArgumentError

__all__ = ["infer", "infer_forward", "log_likelihood", "interim_sigma", "multiplicative_bias"]


def _log_interim(e, sigma):
    """log p_I(e) of complex ellipticities: isotropic Gaussian truncated at |e| < 1."""
    r2 = np.abs(e) ** 2
    norm = np.log(2 * np.pi * sigma**2) + np.log1p(-np.exp(-0.5 / sigma**2))
    return np.where(r2 < 1, -0.5 * r2 / sigma**2 - norm, -np.inf)


def log_likelihood(g, e_draws, sigma_e: float):
    """Importance-sampled log-likelihood of constant shears for an ensemble.

    Parameters
    ----------
    g : complex array (...,)
        Candidate reduced shears g1 + i g2.
    e_draws : array (galaxy, draw, 2)
        Posterior draws of (e1, e2) per galaxy, obtained under the interim prior.
    sigma_e : float
        Dispersion per component of the interim prior.

    Returns
    -------
    array (...,) of log L(g) (up to a constant).
    """
    e = np.asarray(e_draws[..., 0] + 1j * e_draws[..., 1])  # (G, N)
    ok = np.isfinite(e)
    e = np.where(ok, e, 0.0)
    g = np.asarray(g, dtype=complex)
    out = np.empty(g.shape)
    log_pi_obs = _log_interim(e, sigma_e)
    ok &= np.isfinite(log_pi_obs)  # draws outside |e| < 1 carry no weight
    for idx in np.ndindex(g.shape):
        gg = g[idx]
        denom = 1 - np.conj(gg) * e
        e_int = (e - gg) / denom
        log_jac = 2 * np.log1p(-abs(gg) ** 2) - 4 * np.log(np.abs(denom))
        with np.errstate(invalid="ignore"):
            lw = np.where(ok, _log_interim(e_int, sigma_e) + log_jac - log_pi_obs, -np.inf)
        m = lw.max(1, keepdims=True)
        per_gal = m[:, 0] + np.log(np.mean(np.exp(lw - m), 1))
        out[idx] = np.sum(per_gal[np.isfinite(per_gal)])
    return out


def infer(e_draws, sigma_e: float, grid_half_width: float = 0.1, n_grid: int = 81,
          num_samples: int = 4000, seed: int = 0):
    """Posterior of a constant shear (g1, g2) for an ensemble, as ArviZ InferenceData.

    Parameters
    ----------
    e_draws : array (galaxy, draw, 2) or a list of InferenceData from :func:`probdeblend.fit`
        Per-galaxy ellipticity posterior draws. From InferenceData, every source's
        ``e1``, ``e2`` draws (chains pooled) are used.
    sigma_e : float
        Interim-prior dispersion (:func:`interim_sigma`).
    grid_half_width, n_grid :
        The posterior (flat prior on |g| < 1) is evaluated on an ``n_grid`` x ``n_grid`` grid
        of half-width ``grid_half_width`` about the ensemble's mean ellipticity; refined once
        to +-6 sigma of the first pass.
    num_samples : int
        Draws returned (from the gridded posterior, uniformly jittered within a cell).

    Returns
    -------
    arviz.InferenceData with ``posterior`` ``g1``, ``g2`` (1 chain) and attrs ``n_galaxies``,
    ``sigma_e``, posterior means and standard deviations.
    """
    import arviz as az

    e_draws = _as_draws(e_draws)
    centre = np.nanmean(e_draws[..., 0]) + 1j * np.nanmean(e_draws[..., 1])
    half = grid_half_width
    for _ in range(2):
        ax1 = centre.real + np.linspace(-half, half, n_grid)
        ax2 = centre.imag + np.linspace(-half, half, n_grid)
        G = ax1[None, :] + 1j * ax2[:, None]
        logl = log_likelihood(G, e_draws, sigma_e)
        p = np.exp(logl - logl.max())
        p /= p.sum()
        m1, m2 = (p * G.real).sum(), (p * G.imag).sum()
        s1 = np.sqrt((p * (G.real - m1) ** 2).sum())
        s2 = np.sqrt((p * (G.imag - m2) ** 2).sum())
        centre = m1 + 1j * m2
        half = max(6 * max(s1, s2), 4 * (ax1[1] - ax1[0]))
    rng = np.random.default_rng(seed)
    cell = rng.choice(p.size, size=num_samples, p=p.ravel())
    step1, step2 = ax1[1] - ax1[0], ax2[1] - ax2[0]
    g1 = G.real.ravel()[cell] + step1 * (rng.uniform(size=num_samples) - 0.5)
    g2 = G.imag.ravel()[cell] + step2 * (rng.uniform(size=num_samples) - 0.5)
    return az.from_dict(
        posterior={"g1": g1[None], "g2": g2[None]},
        attrs={"n_galaxies": int(e_draws.shape[0]), "sigma_e": float(sigma_e),
               "g1_mean": float(m1), "g2_mean": float(m2), "g1_sd": float(s1),
               "g2_sd": float(s2), "method": "importance-sampled hierarchical (grid)"})


def _as_draws(e_draws):
    if isinstance(e_draws, np.ndarray):
        if e_draws.ndim != 3 or e_draws.shape[-1] != 2:
            raise ArgumentError(
                "e_draws", e_draws.shape,
                f"e_draws must have shape (galaxy, draw, 2), got {e_draws.shape}"
            )
        return e_draws
    out = []
    for idata in e_draws:
        e1 = idata.posterior["e1"].values  # (chain, draw, source)
        e2 = idata.posterior["e2"].values
        for s in range(e1.shape[-1]):
            out.append(np.stack([e1[..., s].ravel(), e2[..., s].ravel()], -1))
    n = min(len(o) for o in out)
    return np.stack([o[:n] for o in out])


def interim_sigma(prior, n: int = 4000, seed: int = 0) -> float:
    """Per-component dispersion of the ellipticities of decoded prior samples.

    ``n`` latents are drawn from the learned prior, decoded, and measured with
    :func:`probdeblend.measure.psf_corrected_shape`; returns ``sqrt(mean(e1^2 + e2^2) / 2)``.
    """
    import torch

    from .measure import psf_corrected_shape

    torch.manual_seed(seed)
    with torch.no_grad():
        imgs = prior.decode(prior.sample((n,))).mean(-3).numpy()
    g1, g2 = psf_corrected_shape(imgs, prior.frame.psf_image(25), prior.frame.pixel_scale)
    ok = np.isfinite(g1) & np.isfinite(g2)
    return float(np.sqrt(np.mean(g1[ok] ** 2 + g2[ok] ** 2) / 2))


def multiplicative_bias(g_true, g_est, g_err=None):
    """Fit ``g_est = (1 + m) g_true + c`` (one component) by weighted least squares.

    Returns dict ``m``, ``c``, ``m_err``, ``c_err`` (1-sigma from the residual scatter when
    ``g_err`` is None, else from the given errors).
    """
    x, y = np.asarray(g_true, float), np.asarray(g_est, float)
    w = np.ones_like(x) if g_err is None else 1.0 / np.asarray(g_err, float) ** 2
    A = np.stack([x, np.ones_like(x)], -1)
    cov = np.linalg.inv(A.T @ (A * w[:, None]))
    beta = cov @ (A.T @ (w * y))
    if g_err is None:
        resid = y - A @ beta
        cov = cov * np.sum(w * resid**2) / max(len(x) - 2, 1)
    return {"m": float(beta[0] - 1), "c": float(beta[1]), "m_err": float(np.sqrt(cov[0, 0])),
            "c_err": float(np.sqrt(cov[1, 1]))}


class _ShearEnsemble:
    """The joint posterior of a shared shear and every scene's sites, in one flat vector
    ``theta = [g1, g2, flat_1, ..., flat_K]``, with the interface that
    :func:`probdeblend.inference.find_map` and ``_nuts_runner`` use."""

    def __init__(self, contexts, shear_scale: float):
        import jax
        import jax.numpy as jnp

        self.contexts = contexts
        self.spec = tuple(c.problem.spec for c in contexts)
        dims = [c.problem.dim for c in contexts]
        self.slices = []
        start = 2
        for d in dims:
            self.slices.append(slice(start, start + d))
            start += d
        self.dim = start
        fns = [c.problem.fn("logp_shear") for c in contexts]
        slices = self.slices

        def logp(theta, specs):
            g = theta[:2]
            out = -0.5 * jnp.sum((g / shear_scale) ** 2)
            for fn, sl, spec in zip(fns, slices, specs, strict=True):
                out = out + fn(jnp.concatenate([g, theta[sl]]), spec)
            return out

        self._logp = logp
        self._vg = jax.jit(jax.value_and_grad(logp))
        self.shear_scale = shear_scale

    def fn(self, name):
        if name != "logp":
            raise KeyError(name)  # protocol: not a user error
        return self._logp

    def logp_and_grad(self, theta):
        return self._vg(theta, self.spec)

    def deterministic(self, flats):
        return {"theta": np.asarray(flats)}

    def hessian(self, theta):
        """Arrowhead Hessian: each scene couples only to the shear."""
        H = np.zeros((self.dim, self.dim))
        H[:2, :2] = -np.eye(2) / self.shear_scale**2
        theta = np.asarray(theta, np.float32)
        for ctx, sl in zip(self.contexts, self.slices, strict=True):
            Hk = np.asarray(ctx.problem.fn("hessian_shear")(
                np.concatenate([theta[:2], theta[sl]]), ctx.problem.spec), np.float64)
            idx = np.r_[0, 1, np.arange(sl.start, sl.stop)]
            H[np.ix_(idx, idx)] += Hk
        return H


def _newton(ens: _ShearEnsemble, theta, floored_inverse, max_iter: int = 8):
    """Newton steps with the arrowhead Hessian, halving a step until log p improves.

    Needed after L-BFGS: per galaxy the shear is nearly degenerate with the intrinsic
    ellipticity, so at the per-scene MAPs the gradient in ``g`` is tiny (only the latent prior
    breaks the degeneracy) and L-BFGS's relative-decrease test can stop it at ``g = 0``; a
    Newton step uses the curvature and moves ``g`` to the joint maximum of the (near-quadratic)
    posterior. Returns (theta, Laplace covariance at theta).
    """
    theta = np.asarray(theta, np.float64)
    value, grad = ens.logp_and_grad(theta.astype(np.float32))
    value = float(value)
    cov = floored_inverse(-ens.hessian(theta))
    for _ in range(max_iter):
        step = cov @ np.asarray(grad, np.float64)
        for _ in range(6):
            trial = theta + step
            if np.hypot(*trial[:2]) < 0.9:
                new, new_grad = ens.logp_and_grad(trial.astype(np.float32))
                if float(new) >= value - 1e-3:
                    break
            step = step / 2
        else:
            break
        theta, value, grad = trial, float(new), new_grad
        cov = floored_inverse(-ens.hessian(theta))
        if np.abs(step[:2]).max() < 1e-5:
            break
    return theta, cov


def infer_forward(scenes, prior="lsst-vae", method: str = "nuts", num_warmup: int = 150,
                  num_samples: int = 300, num_chains: int = 2, shear_scale: float = 0.1,
                  seed: int = 0):
    """Full-forward-model posterior of a constant shear (g1, g2) shared by a few scenes.

    One joint model: ``g ~ Normal(0, shear_scale)`` per component, and for every scene the
    scene model of :mod:`probdeblend.model` with every decoded galaxy (the *intrinsic*,
    unlensed galaxy, drawn from the learned prior) sheared by ``g`` before the PSF
    (:func:`probdeblend.render.shear_stamps`). Inference: MAP of each scene from its amortized
    posterior (``g = 0``), joint MAP by L-BFGS then Newton steps (:func:`_newton`), Laplace
    approximation (the Hessian is an
    arrowhead: scenes couple only through ``g``) and, for ``method="nuts"``, NUTS with that
    dense mass matrix. The cost grows with the total number of sources (every scene's latents
    are sampled): meant for ensembles of a few to a few tens of scenes; use :func:`infer` for
    large ones. The result depends on the learned prior being isotropic (no preferred
    orientation), which is what the shear is measured against.

    Parameters
    ----------
    scenes : list of probdeblend.Scene
        Scenes with ``positions`` set (or detectable), all at the prior's pixel scale.
    prior : str or LearnedPrior
    method : "nuts" or "laplace"
        ``laplace`` returns draws of the Laplace approximation (fast).
    num_warmup, num_samples, num_chains : int
        NUTS settings (``laplace``: ``num_samples`` draws, one chain).
    shear_scale : float
        Prior width of each shear component.
    seed : int

    Returns
    -------
    arviz.InferenceData with ``posterior`` ``g1``, ``g2`` (chain, draw) and attrs
    ``g1_mean``, ``g2_mean``, ``g1_sd``, ``g2_sd``, ``n_scenes``, ``n_sources``, ``method``,
    ``time_s``.
    """
    import time

    import arviz as az

    from .inference import find_map, floored_inverse, run_nuts
    from .scene_posterior import PRIORS, ScenePosterior

    if method not in ("nuts", "laplace"):
        raise ArgumentError("method", method, f"method must be 'nuts' or 'laplace', got {method!r}")
    if len(scenes) == 0:
        raise ArgumentError("scenes", scenes, "scenes is empty; pass a list of probdeblend.Scene")
    if not shear_scale > 0:
        raise ArgumentError(
            "shear_scale", shear_scale, f"shear_scale must be > 0, got {shear_scale}"
        )
    t0 = time.perf_counter()
    prior = PRIORS.prior(prior)
    contexts, flats = [], [np.zeros(2)]
    for scene in scenes:
        ctx = ScenePosterior(scene, prior, cache=PRIORS)
        flat, _ = ctx.map()
        contexts.append(ctx)
        flats.append(flat)
    ens = _ShearEnsemble(contexts, shear_scale)
    theta0 = np.concatenate(flats)
    bounds = [(-0.9, 0.9)] * 2 + [(None, None)] * (ens.dim - 2)  # |g| < 1 for the renderer
    theta_map, _ = find_map(ens, None, x0=theta0, bounds=bounds)
    theta_map, cov = _newton(ens, theta_map, floored_inverse)
    if method == "laplace":
        rng = np.random.default_rng(seed)
        g = theta_map[:2] + rng.multivariate_normal(np.zeros(2), cov[:2, :2], num_samples)
        g = g[None]
    else:
        post = run_nuts(ens, theta_map, cov, num_warmup=num_warmup, num_samples=num_samples,
                        num_chains=num_chains, seed=seed)
        g = post.samples["theta"][..., :2]
    g1, g2 = g[..., 0], g[..., 1]
    return az.from_dict(
        posterior={"g1": g1, "g2": g2},
        attrs={"g1_mean": float(g1.mean()), "g2_mean": float(g2.mean()),
               "g1_sd": float(g1.std()), "g2_sd": float(g2.std()),
               "n_scenes": len(scenes), "n_sources": int(sum(c.n_sources for c in contexts)),
               "method": f"forward model ({method})", "time_s": time.perf_counter() - t0})
