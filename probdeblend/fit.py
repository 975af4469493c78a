"""``probdeblend.fit``: from a :class:`~probdeblend.Scene` to posterior samples of every galaxy.

Pipeline (see docs/inference.md):

1. **Sources**: ``scene.positions`` if given, else detection with sep on the detection image
   (:func:`probdeblend.detection.detect`), then one residual-based pass for missed sources.
2. **Amortized posterior**: one forward pass per source of the blend encoder shipped with the
   prior gives q(latent, log-flux, offset) (:mod:`probdeblend.amortized`).
3. **Refinement** by ``method``:

   * ``"amortized"``: q's draws importance-reweighted with the full scene likelihood and prior,
     source by source (the other sources held at their q means); Pareto k-hat per source.
   * ``"svi"``: full-rank Gaussian SVI over the whole scene, initialised from q.
   * ``"nuts"``: NUTS over all sources jointly (NumPyro, jitted; ``engine="pyro"`` runs Pyro's),
     from the MAP with a dense mass matrix from the Laplace approximation there.
   * ``"auto"``: ``"amortized"``, then ``"nuts"`` for the scene if any source has k-hat > 0.7.

4. **Measurement** of every draw: flux per band, ellipticity (e1, e2) of the PSF-free galaxy
   (:func:`probdeblend.measure.psf_corrected_shape` on the decoded model-frame image), position.
5. **Result**: :class:`arviz.InferenceData` (:mod:`probdeblend.diagnostics`).

Conventions: flux in the image's units (total flux of the PSF-convolved galaxy); e1, e2 GalSim
reduced shear of the PSF-free galaxy; x, y in the Scene's 0-based pixel convention.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from .errors import ProbdeblendError
from .scene import Scene

__all__ = ["fit", "METHODS", "FitContext"]

METHODS = ("auto", "amortized", "svi", "nuts")

#: priors loaded by name in this process (with their compiled log-densities)
_PRIORS: dict = {}


class FitContext:
    """Everything ``fit`` builds for one scene (prior, renderer, spec, problem, amortized q).

    Kept public so that users can run the engines of :mod:`probdeblend.inference` themselves.
    """

    def __init__(self, scene: Scene, prior, positions, amortized=None, flux_scale: float = 2.0,
                 position_scale: float = 1.0):
        from .inference import SceneProblem
        from .model import Backend, SceneSpec
        from .render import SceneRenderer

        self.scene, self.prior = scene, prior
        cached = prior.__dict__.get("_probdeblend_numpyro")
        if cached is None:  # one twin + backend per prior: compiled functions are reused
            np_prior = prior.to_numpyro()
            backend = Backend.numpyro(np_prior)
            backend.torch_prior = prior
            cached = prior.__dict__["_probdeblend_numpyro"] = (np_prior, backend)
        self.np_prior, self.backend = cached
        self.renderer = SceneRenderer.from_scene(scene, prior.frame)
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if amortized is not None:
            self.q = amortized.predict(scene, positions)
        else:
            self.q = _fallback_q(scene, prior, positions)
        self.spec = SceneSpec.build(self.backend, scene, self.renderer, self.q["positions"],
                                    np.exp(self.q["log_flux_loc"]), prior.latent_dim,
                                    flux_scale=flux_scale, position_scale=position_scale)
        self.problem = SceneProblem(self.backend, self.spec)
        twin = self.np_prior.twin
        z = np.asarray(self.q["z_loc"], np.float32)
        u, _ = twin.flow_inverse(z)
        self.init = {"latent_base": np.asarray(u), "log_flux": self.q["log_flux_loc"],
                     "offset": np.zeros_like(self.q["positions"])}

    @property
    def n_sources(self) -> int:
        return int(self.spec.n_sources)

    def q_flat(self):
        """Mean and diagonal covariance of q in the flat (latent_base, log_flux, offset) space.

        The latent scale is carried over to the flow's base space unchanged (the flow is near
        the identity at the scale of q; this only initialises SVI).
        """
        loc = self.problem.flatten(self.init)
        scale = self.problem.flatten({"latent_base": self.q["z_scale"],
                                      "log_flux": self.q["log_flux_scale"],
                                      "offset": self.q["offset_scale"]})
        return loc, np.diag(scale**2)

    def sample_q(self, num_samples: int, seed: int = 0) -> np.ndarray:
        """Draws of the amortized q itself, without reweighting, as flat vectors (n, dim).

        The latent draws are mapped through the inverse flow to the sampler's base space;
        offsets are relative to ``q["positions"]`` in pixels, log-fluxes in log(image units).
        """
        q, n = self.q, int(num_samples)
        rng = np.random.default_rng(seed)
        z = q["z_loc"][None] + q["z_scale"][None] * rng.standard_normal((n,) + q["z_loc"].shape)
        u = np.asarray(self.np_prior.twin.flow_inverse(z.astype(np.float32))[0])
        lf = q["log_flux_loc"][None] + q["log_flux_scale"][None] * rng.standard_normal(
            (n,) + q["log_flux_loc"].shape)
        off = q["offset_scale"][None] * rng.standard_normal((n, self.n_sources, 2))
        return self.problem.flatten_draws({"latent_base": u, "log_flux": lf, "offset": off})


def resolve_prior(prior):
    """A loaded prior from a shipped name / path, or ``prior`` itself if already loaded.

    Priors loaded by name are kept for the process (:data:`_PRIORS`), so the functions compiled
    for them are reused by later calls.
    """
    from .priors.distribution import LearnedPrior
    from .priors.io import load_prior

    if isinstance(prior, LearnedPrior):
        return prior
    if prior not in _PRIORS:
        _PRIORS[prior] = load_prior(prior)
    return _PRIORS[prior]


def _fallback_q(scene, prior, positions):
    """Crude starting point when no amortized encoder exists for the prior: z = 0, sep Kron
    fluxes, the given positions, broad scales."""
    from .detection import sep_baseline

    S, B, D = len(positions), scene.n_bands, prior.latent_dim
    flux = np.full((S, B), 1.0)
    tab = sep_baseline(scene)
    if len(tab):
        for s, (x, y) in enumerate(positions):
            j = int(np.argmin((tab["x"] - x) ** 2 + (tab["y"] - y) ** 2))
            flux[s] = [max(float(tab[f"flux_{b}"][j]), 1.0) for b in scene.bands]
    return {"z_loc": np.zeros((S, D)), "z_scale": np.ones((S, D)),
            "log_flux_loc": np.log(flux), "log_flux_scale": np.full((S, B), 0.5),
            "offset_loc": np.zeros((S, 2)), "offset_scale": np.full((S, 2), 0.5),
            "positions": positions.copy()}


def _check_args(scene, method, num_samples, num_chains, seed):
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a probdeblend.Scene, got {type(scene).__name__}; "
                        f"build one with probdeblend.Scene(image, variance, psf, bands, "
                        f"pixel_scale) or Scene.from_fits(path)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, v in (("num_samples", num_samples), ("num_chains", num_chains)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _prepare_scene(scene: Scene, prior) -> Scene:
    missing = [b for b in prior.bands if b not in scene.bands]
    if missing:
        from .errors import BandMismatchError

        raise BandMismatchError(
            "bands", f"the prior {prior.name!r} needs bands {list(prior.bands)} but the scene "
                     f"lacks {missing}; load a prior with bands=... that the scene has")
    return scene.select_bands(prior.bands) if tuple(scene.bands) != tuple(prior.bands) else scene


def _sources(scene, detect_kwargs):
    from .detection import detect

    if scene.positions is not None and len(scene.positions):
        return np.asarray(scene.positions, dtype=np.float64), None
    table = detect(scene, **(detect_kwargs or {}))
    if len(table) == 0:
        raise ProbdeblendError("no source was detected in the scene; pass positions= (x, y) "
                               "or lower the detection threshold (detect_kwargs)")
    return np.stack([table["x"], table["y"]], -1).astype(np.float64), table


def _amortized_draws(ctx: FitContext, num_samples: int, seed: int, n_proposals: int):
    """Per-source importance reweighting of q's draws; returns (flat draws (n, dim), k-hat)."""
    from .inference import pareto_k

    rng = np.random.default_rng(seed)
    twin = ctx.np_prior.twin
    q, S = ctx.q, ctx.n_sources
    base = ctx.init
    out = {k: np.repeat(np.asarray(v, np.float64)[None], num_samples, 0) for k, v in base.items()}
    ks = np.zeros(S)
    for s in range(S):
        z = q["z_loc"][s] + q["z_scale"][s] * rng.standard_normal(
            (n_proposals, q["z_loc"].shape[1]))
        lf = q["log_flux_loc"][s] + q["log_flux_scale"][s] * rng.standard_normal(
            (n_proposals, q["log_flux_loc"].shape[1]))
        off = q["offset_scale"][s] * rng.standard_normal((n_proposals, 2))
        u, logdet_du_dz = twin.flow_inverse(np.asarray(z, np.float32))
        u = np.asarray(u, np.float64)
        log_q_z = _diag_normal_logpdf(z, q["z_loc"][s], q["z_scale"][s])
        log_q = (log_q_z - np.asarray(logdet_du_dz, np.float64)
                 + _diag_normal_logpdf(lf, q["log_flux_loc"][s], q["log_flux_scale"][s])
                 + _diag_normal_logpdf(off, 0.0, q["offset_scale"][s]))
        params = {k: np.repeat(np.asarray(v, np.float64)[None], n_proposals, 0)
                  for k, v in base.items()}
        params["latent_base"][:, s], params["log_flux"][:, s], params["offset"][:, s] = u, lf, off
        log_w = ctx.problem.logp_batch(ctx.problem.flatten_draws(params)) - log_q
        log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
        ks[s] = pareto_k(log_w)
        w = np.exp(log_w - log_w.max())
        idx = rng.choice(n_proposals, size=num_samples, p=w / w.sum())
        out["latent_base"][:, s], out["log_flux"][:, s] = u[idx], lf[idx]
        out["offset"][:, s] = off[idx]
    return ctx.problem.flatten_draws(out), ks


def _diag_normal_logpdf(x, loc, scale):
    x, loc, scale = np.asarray(x), np.asarray(loc), np.asarray(scale)
    return np.sum(-0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi), -1)


def measure_draws(ctx: FitContext, latent, batch: int = 512):
    """Ellipticity (e1, e2) of the PSF-free galaxy for latent draws (..., S, D)."""
    from .measure import psf_corrected_shape

    frame = ctx.prior.frame
    psf = frame.psf_image(25)
    z = np.asarray(latent, np.float32)
    lead = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1])
    decode = ctx.problem.fn("decode")
    e1 = np.empty(len(flat))
    e2 = np.empty(len(flat))
    for i in range(0, len(flat), batch):
        stamps = np.asarray(decode(flat[i:i + batch])).mean(-3)  # average of unit-sum bands
        e1[i:i + batch], e2[i:i + batch] = psf_corrected_shape(stamps, psf, frame.pixel_scale)
    return e1.reshape(lead), e2.reshape(lead)


def _derived(ctx: FitContext, flats_cd):
    """Posterior variables (chain, draw, ...) from flat draws (chain, draw, dim)."""
    det = ctx.problem.deterministic(flats_cd)
    e1, e2 = measure_draws(ctx, det["latent"])
    return {
        "flux": np.exp(det["log_flux"]),
        "e1": e1, "e2": e2,
        "x": det["position"][..., 0], "y": det["position"][..., 1],
        "latent": det["latent"],
        "log_flux": det["log_flux"],
    }, det


def _predictive(ctx: FitContext, det, n_ppc: int, seed: int, batch: int = 64):
    """Per-band log-likelihood of every draw, a thinned posterior predictive and the mean
    noiseless model image."""
    spec, prob = ctx.spec, ctx.problem
    C, N = det["log_flux"].shape[:2]

    def batched(name, z, lf, pos):
        out = []
        for i in range(0, len(z), batch):
            out.append(np.asarray(prob.fn(name)(z[i:i + batch], lf[i:i + batch],
                                                pos[i:i + batch], spec)))
        return np.concatenate(out)

    ll = np.stack([batched("loglike_bands", det["latent"][c], det["log_flux"][c],
                           det["position"][c]) for c in range(C)]).astype(np.float64)
    idx = np.linspace(0, N - 1, min(n_ppc, N)).astype(int)
    rng = np.random.default_rng(seed)
    models = np.stack([batched("model_image", det["latent"][c][idx], det["log_flux"][c][idx],
                               det["position"][c][idx]) for c in range(C)])
    ppc = (models + np.asarray(spec.sigma) * rng.standard_normal(models.shape)).astype(np.float32)
    return ll, ppc, idx, models.mean((0, 1))


def fit(scene: Scene, prior="lsst-vae", method: str = "auto", num_samples: int = 1000,
        seed: int = 0, num_chains: int = 4, num_warmup: int = 300, svi_steps: int = 1000,
        pareto_k_threshold: float = 0.7, n_proposals: int | None = None,
        detect_kwargs: dict | None = None, engine: str = "numpyro", n_ppc: int = 20,
        progress: bool = False, check: bool = True):
    """Deblend a scene: posterior samples of every source's flux, ellipticity and position.

    Parameters
    ----------
    scene : Scene
        The observation. Its bands must include the prior's; extra bands are ignored.
        ``scene.positions`` (0-based pixel (x, y)) skips detection.
    prior : str or LearnedPrior
        Shipped prior name (``"lsst-vae"``, ``"lsst-vaegan"``), a path, or a loaded prior.
    method : {"auto", "amortized", "svi", "nuts"}
        See the module docstring.
    num_samples : int
        Posterior draws per chain (``amortized`` / ``svi``: one chain of this many draws).
    seed : int
        Seeds every random step; the same seed gives the same result.
    num_chains, num_warmup : int
        NUTS chains (run vectorised) and warm-up iterations.
    svi_steps : int
        SVI optimisation steps.
    pareto_k_threshold : float
        ``auto`` falls back to NUTS when any source's k-hat exceeds it.
    n_proposals : int, optional
        Amortized draws per source before reweighting (default ``4 * num_samples``).
    detect_kwargs : dict, optional
        Passed to :func:`probdeblend.detection.detect`.
    engine : {"numpyro", "pyro"}
        NUTS implementation for ``method="nuts"``.
    n_ppc : int
        Posterior-predictive images kept per chain.
    progress : bool
        Progress bars of the samplers.
    check : bool
        Run :func:`probdeblend.diagnostics.check_convergence` (warns) for NUTS.

    Returns
    -------
    arviz.InferenceData
        ``posterior``: ``flux`` (chain, draw, source, band), ``e1``, ``e2``, ``x``, ``y``
        (chain, draw, source), ``latent`` (chain, draw, source, latent_dim), ``log_flux``;
        ``sample_stats``; ``observed_data``; ``posterior_predictive`` (thinned);
        ``log_likelihood`` (per band); attrs with the method used, per-source Pareto k-hat,
        timings. :func:`probdeblend.diagnostics.summary_table` gives the per-source table.
    """
    from . import diagnostics

    _check_args(scene, method, num_samples, num_chains, seed)
    if engine not in ("numpyro", "pyro"):
        raise ValueError(f"engine must be 'numpyro' or 'pyro', got {engine!r}")
    t_start = time.perf_counter()
    timings = {}
    prior = resolve_prior(prior)
    scene = _prepare_scene(scene, prior)
    positions, det_table = _sources(scene, detect_kwargs)
    amortized = _load_amortized(prior)
    t0 = time.perf_counter()
    ctx = FitContext(scene, prior, positions, amortized)
    if det_table is not None:  # one residual pass for sources the detector merged or missed
        ctx = _residual_pass(ctx, scene, prior, amortized)
    timings["amortized_s"] = time.perf_counter() - t0
    used = method
    info = {}
    n_prop = int(n_proposals or 4 * num_samples)
    stats = {}
    if method in ("amortized", "auto"):
        t0 = time.perf_counter()
        flats, ks = _amortized_draws(ctx, num_samples, seed, n_prop)
        timings["reweight_s"] = time.perf_counter() - t0
        info["pareto_k"] = ks
        flats_cd = flats[None]
        stats = {"lp": ctx.problem.logp_batch(flats)[None]}
        used = "amortized+is"
        if method == "auto" and np.any(ks > pareto_k_threshold):
            method = "nuts"
    if method == "svi":
        from .inference import run_svi

        loc, cov = ctx.q_flat()
        post = run_svi(ctx.problem, loc, cov, num_steps=svi_steps, num_samples=num_samples,
                       seed=seed, progress=progress)
        flats_cd = ctx.problem.flatten_draws(post.samples)
        stats, used = post.sample_stats, "svi"
        timings.update(post.timings)
        info.update({k: v for k, v in post.info.items() if k != "elbo"})
    elif method == "nuts":
        from .inference import find_map, laplace, run_nuts, run_nuts_pyro

        t0 = time.perf_counter()
        flat_map, map_info = find_map(ctx.problem, ctx.init)
        cov = laplace(ctx.problem, flat_map)
        timings["map_laplace_s"] = time.perf_counter() - t0
        info.update(map_info)
        runner = run_nuts if engine == "numpyro" else run_nuts_pyro
        post = runner(ctx.problem, flat_map, cov, num_warmup=num_warmup,
                      num_samples=num_samples, num_chains=num_chains, seed=seed,
                      progress=progress)
        flats_cd = ctx.problem.flatten_draws(post.samples)
        stats, used = post.sample_stats, f"nuts ({engine})"
        timings.update(post.timings)
        info.update(post.info)
    t0 = time.perf_counter()
    draws, det = _derived(ctx, flats_cd)
    ll, ppc, ppc_idx, mean_model = _predictive(ctx, det, n_ppc, seed)
    timings["measure_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    attrs = {
        "method": used, "method_requested": method, "prior": prior.name,
        "n_sources": ctx.n_sources, "seed": int(seed),
        "detected": int(det_table is not None),
        "pareto_k": np.asarray(info.get("pareto_k", np.full(ctx.n_sources, np.nan))).tolist(),
        **{f"time_{k}": round(float(v), 3) for k, v in timings.items()},
        **{k: v for k, v in info.items()
           if isinstance(v, (int, float, str)) and k != "pareto_k"},
    }
    idata = diagnostics.to_inference_data(
        draws, stats, scene, posterior_predictive=ppc, log_likelihood=ll, attrs=attrs,
        predictive_draw_index=ppc_idx)
    _add_constant_data(idata, scene, mean_model, ctx.q["positions"])
    if check and used.startswith("nuts"):
        diagnostics.check_convergence(idata, ess_min=min(400, 0.5 * num_samples * num_chains))
    return idata


def _add_constant_data(idata, scene, mean_model, positions0):
    """``constant_data``: the posterior-mean noiseless model image (band, y, x) and the
    starting positions of the sources (source, xy)."""
    import xarray as xr

    ny, nx = scene.shape
    ds = xr.Dataset(
        {"model_mean": (("band", "y", "x"), np.asarray(mean_model, np.float32)),
         "position_init": (("source", "xy"), np.asarray(positions0, np.float64))},
        coords={"band": list(scene.bands), "y": np.arange(ny), "x": np.arange(nx),
                "source": idata.posterior["source"].values, "xy": ["x", "y"]})
    idata.add_groups({"constant_data": ds})


def _load_amortized(prior):
    try:
        from .amortized import AmortizedPosterior
    except ImportError:  # pragma: no cover
        return None
    try:
        return AmortizedPosterior.for_prior(prior.name)
    except ProbdeblendError:
        warnings.warn(f"no amortized encoder is shipped for prior {prior.name!r}: starting from "
                      f"sep fluxes and z = 0 (slower; use method='nuts')", stacklevel=3)
        return None


def _residual_pass(ctx: FitContext, scene, prior, amortized):
    from .detection import detect_residual

    q = ctx.q
    model = ctx.problem.fn("model_image")(
        np.asarray(q["z_loc"], np.float32)[None], np.asarray(q["log_flux_loc"], np.float32)[None],
        np.asarray(q["positions"], np.float32)[None], ctx.spec)
    new = detect_residual(scene, np.asarray(model[0]), q["positions"])
    if len(new) == 0:
        return ctx
    positions = np.concatenate([q["positions"], np.stack([new["x"], new["y"]], -1)])
    return FitContext(scene, prior, positions, amortized)
