"""``probdeblend.fit``: from a :class:`~probdeblend.Scene` to posterior samples of every galaxy.

``fit`` is a short composition of the staged API of :mod:`probdeblend.scene_posterior`
(see docs/inference.md and docs/architecture.md)::

    post = ScenePosterior(scene, prior, positions)      # sources, amortized q, scene problem
    draws = post.amortized() | post.laplace() | post.nuts() | post.svi()
    idata = post.to_inference_data(draws)

``method``:

* ``"amortized"``: q's own draws (the encoder trained by neural posterior estimation on the
  model's own simulations; no reweighting, no decode per draw for e and positions), with
  fluxes from the closed-form photometry given q's morphology
  (:meth:`ScenePosterior.photometry`; they can be consistent with zero).
* ``"laplace"``: whole-scene MAP from q, Laplace covariance, Pareto-smoothed importance
  sampling with a Student-t proposal; the scene's k-hat in ``attrs["pareto_k"]``.
* ``"nuts"``: NUTS over all sources jointly (NumPyro), dense mass from the Laplace covariance.
* ``"svi"``: full-rank Gaussian SVI initialised from q.
* ``"auto"`` (default): a ladder. q first; ``laplace`` when ``exact=True`` or when q fails its
  check (the q-mean model leaves a residual chi^2 / pixel above ``q_chi2_max`` around a source:
  a scene unlike the training simulations); ``nuts`` only when the Laplace + PSIS k-hat
  exceeds ``pareto_k_threshold`` (with ``num_samples`` draws in all, split over the chains,
  from the MAP the laplace rung found), within a budget: ``nuts.max_seconds``, or
  :data:`~probdeblend.scene_posterior.LADDER_NUTS_SECONDS` (120 s of sampling) when that is
  None. NUTS's run time is projected after each compiled segment of ~25 iterations; over
  the budget it stops and the laplace draws are kept, with a warning.
  ``attrs["path"]`` records every step and why.

Conventions: flux in the image's units (total flux of the PSF-convolved galaxy); e1, e2 GalSim
reduced shear of the PSF-free galaxy; ``x_pix``, ``y_pix`` in the Scene's 0-based pixel
convention.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .errors import BudgetExceededError
from .scene import Scene
from .scene_posterior import (
    LADDER_NUTS_SECONDS,
    LAPLACE_SHAPES,
    PRIORS,
    LaplaceConfig,
    NutsConfig,
    ScenePosterior,
    SviConfig,
)

__all__ = ["fit", "METHODS", "q_residual_chi2"]

METHODS = ("auto", "amortized", "laplace", "nuts", "svi")
DEFAULT_NUTS, DEFAULT_SVI, DEFAULT_LAPLACE = NutsConfig(), SviConfig(), LaplaceConfig()


def q_residual_chi2(post: ScenePosterior, radius: float = 6.0) -> np.ndarray:
    """chi^2 per valid pixel of the q-mean model's residual within ``radius`` pixels of each
    source, ``(S,)``: ~1 when q explains the data, larger when it does not."""
    spec = post.spec
    r2 = ((np.asarray(spec.image) - post.q_mean_model()) / np.asarray(spec.sigma)) ** 2
    good = np.asarray(spec.good)
    ny, nx = r2.shape[-2:]
    yy, xx = np.mgrid[:ny, :nx]
    out = np.empty(post.n_sources)
    for s, (x, y) in enumerate(post.positions0):
        m = ((xx - x) ** 2 + (yy - y) ** 2 <= radius**2)[None] & good
        out[s] = r2[m].mean() if m.any() else np.nan
    return out


def _validate(scene, method, num_samples, seed, pareto_k_threshold, q_chi2_max, model_error,
              n_predictive, nuts, svi, laplace):
    from .errors import ArgumentTypeError
    from .inference import CHAIN_METHODS
    from .validate import check_choice, check_float, check_int, check_seed

    if not isinstance(scene, Scene):
        raise ArgumentTypeError(
            "scene", scene, "a probdeblend.Scene; build one with probdeblend.Scene(image, "
                            "variance, psf, bands, pixel_scale) or Scene.from_fits(path)")
    check_choice("method", method, METHODS)
    check_int("num_samples", num_samples, minimum=1)
    check_seed("seed", seed)
    check_float("pareto_k_threshold", pareto_k_threshold, minimum=0.0)
    check_float("q_chi2_max", q_chi2_max, minimum=0.0, exclusive_minimum=True)
    check_float("model_error", model_error, minimum=0.0)
    check_int("n_predictive", n_predictive, minimum=0, allow_none=True)
    for name, value, cls in (("nuts", nuts, NutsConfig), ("svi", svi, SviConfig),
                             ("laplace", laplace, LaplaceConfig)):
        if not isinstance(value, cls):
            raise ArgumentTypeError(name, value, f"a probdeblend.{cls.__name__}(...)")
    check_int("nuts.num_warmup", nuts.num_warmup, minimum=1)
    check_int("nuts.num_chains", nuts.num_chains, minimum=1)
    check_int("nuts.max_tree_depth", nuts.max_tree_depth, minimum=1)
    check_float("nuts.max_seconds", nuts.max_seconds, minimum=0.0, exclusive_minimum=True,
                allow_none=True)
    check_choice("nuts.engine", nuts.engine, ("numpyro", "pyro"))
    check_choice("nuts.chain_method", nuts.chain_method, CHAIN_METHODS)
    check_int("svi.num_steps", svi.num_steps, minimum=1)
    check_float("svi.lr", svi.lr, minimum=0.0, exclusive_minimum=True)
    check_choice("laplace.proposal", laplace.proposal, ("t", "gaussian"))
    check_choice("laplace.shapes", laplace.shapes, LAPLACE_SHAPES)
    check_float("laplace.df", laplace.df, minimum=1.0)
    check_int("laplace.n_proposals", laplace.n_proposals, minimum=1, allow_none=True)


def fit(scene: Scene, prior="lsst-vae", *, method: str = "auto", num_samples: int = 1000,
        seed: int = 0, positions=None, exact: bool = False,
        pareto_k_threshold: float = 0.7, q_chi2_max: float = 1.5, model_error: float = 0.0,
        nuts: NutsConfig = DEFAULT_NUTS, svi: SviConfig = DEFAULT_SVI,
        laplace: LaplaceConfig = DEFAULT_LAPLACE, detect_kwargs: dict | None = None,
        n_predictive: int | None = 100, progress: bool = False, check: bool = True,
        refine: int = 0):
    """Deblend a scene: posterior samples of every source's flux, ellipticity and position.

    Parameters
    ----------
    scene : Scene
        The observation. Its bands must include the prior's; extra bands are ignored.
    prior : str or LearnedPrior
        Shipped prior name (``"lsst-vae"``, ``"lsst-vaegan"``), a path, or a loaded prior.
    method : {"auto", "amortized", "laplace", "nuts", "svi"}
        See the module docstring.
    num_samples : int
        Posterior draws. ``method="nuts"``: per chain. On the ``auto`` ladder every rung
        returns about ``num_samples`` draws in all: its NUTS rung runs
        ``ceil(num_samples / nuts.num_chains)`` per chain.
    seed : int
        Seeds every random step; the same seed gives the same result.
    positions : array (S, 2), optional
        Source ``(x, y)`` pixels (0-based); default ``scene.positions``, else detection.
    exact : bool
        ``auto`` starts at ``laplace`` (exact up to the PSIS diagnostic) instead of q.
    pareto_k_threshold : float
        ``auto`` moves from ``laplace`` to ``nuts`` above this k-hat.
    q_chi2_max : float
        ``auto`` moves from q to ``laplace`` when a source's q-mean residual chi^2 / pixel
        (:func:`q_residual_chi2`) exceeds it.
    model_error : float
        Fractional model error added to the pixel noise of the likelihood (see
        :meth:`probdeblend.model.SceneSpec.build`); widens bright sources' posteriors where
        percent-level model mismatch dominates the photon noise. 0: pure pixel noise.
    nuts, svi, laplace : NutsConfig, SviConfig, LaplaceConfig
        Engine settings.
    detect_kwargs : dict, optional
        Passed to :func:`probdeblend.detection.detect`.
    n_predictive : int or None
        Posterior-predictive images kept (evenly spaced draws; ``None`` = one per draw).
        The log-likelihood is always stored for every draw.
    progress : bool
        Progress bars of the engines that have them (NUTS, SVI).
    check : bool
        Warn (:func:`probdeblend.diagnostics.check_convergence`) when NUTS has not converged.
    refine : int
        ``amortized`` (and ``auto``'s first rung): L-BFGS iterations of the whole scene from
        q's mean before the draws (:meth:`ScenePosterior.refined`); 0 = none. About 40 close
        most of the few-per-cent flux bias of q's mean morphology, at ~1 s per 80x80 scene.

    Returns
    -------
    arviz.InferenceData
        ``posterior``: ``flux`` (chain, draw, source, band), ``e1``, ``e2``, ``x_pix``,
        ``y_pix`` (chain, draw, source), ``latent``, ``log_flux``; ``sample_stats``;
        ``observed_data``; ``constant_data``; ``posterior_predictive``; ``log_likelihood``;
        ``deblended`` (each source's image); attrs ``method`` (what ran), ``path`` (the
        ladder), ``pareto_k``, timings. :func:`probdeblend.diagnostics.summary_table` gives the
        per-source table. Schema: :mod:`probdeblend.results`.
    """
    _validate(scene, method, num_samples, seed, pareto_k_threshold, q_chi2_max, model_error,
              n_predictive, nuts, svi, laplace)
    from .validate import check_int

    check_int("refine", refine, minimum=0)
    laplace = dataclasses.replace(laplace, k_max=pareto_k_threshold)
    t0 = time.perf_counter()
    post = ScenePosterior(scene, prior, positions, detect_kwargs=detect_kwargs,
                          model_error=model_error, cache=PRIORS)
    path, stopped = [], None
    if method == "auto":
        stage = "laplace"
        if not exact and post.encoder is not None:
            draws = post.amortized(num_samples, seed, refine=refine)
            chi2 = q_residual_chi2(post)
            draws.info["q_chi2"] = chi2.tolist()
            bad = np.flatnonzero(~(chi2 <= q_chi2_max))
            if len(bad):
                path.append(f"amortized (q residual chi2/pixel {np.nanmax(chi2):.2f} > "
                            f"{q_chi2_max} for sources {bad.tolist()})")
            else:
                path.append("amortized (q check passed)")
                stage = None
        if stage == "laplace":
            draws = post.laplace(num_samples, seed, laplace)
            k = draws.info["pareto_k"]
            path.append(f"laplace (k-hat {k:.2f})")
            if k > pareto_k_threshold:
                path[-1] = f"laplace (k-hat {k:.2f} > {pareto_k_threshold})"
                per_chain = -(-num_samples // nuts.num_chains)  # the rung's draws in total
                rung = nuts if nuts.max_seconds is not None or nuts.engine != "numpyro" else \
                    dataclasses.replace(nuts, max_seconds=LADDER_NUTS_SECONDS)
                name = (f"nuts ({nuts.engine}, {nuts.num_chains} x ({nuts.num_warmup} + "
                        f"{per_chain}))")
                try:
                    draws = post.nuts(per_chain, seed, rung, progress)
                    path.append(name)
                except BudgetExceededError as err:  # keep the laplace draws, flagged
                    how = (f"stopped after {err.elapsed_s:.0f} s: projected" if
                           err.elapsed_s > 0 else "not started: predicted at least")
                    stopped = (f"{name} {how} {err.projected_s:.0f} s > budget "
                               f"{rung.max_seconds:g} s; laplace draws kept")
                    path.append(stopped)
    else:
        engines = {"amortized": lambda: post.amortized(num_samples, seed, refine=refine),
                   "laplace": lambda: post.laplace(num_samples, seed, laplace),
                   "nuts": lambda: post.nuts(num_samples, seed, nuts, progress),
                   "svi": lambda: post.svi(num_samples, seed, svi, progress)}
        draws = engines[method]()
        path.append(draws.method)
    idata = post.to_inference_data(
        draws, n_predictive=n_predictive, seed=seed,
        attrs={"path": " -> ".join(path), "method_requested": method, "seed": int(seed),
               "time_total_s": round(time.perf_counter() - t0, 3)})
    if check:
        from . import diagnostics

        if draws.method == "nuts":
            diagnostics.check_convergence(
                idata, ess_min=min(400, 0.5 * num_samples * nuts.num_chains))
        import warnings

        from .errors import ProbdeblendWarning

        k = draws.info.get("pareto_k")
        if stopped:
            warnings.warn(f"{stopped} (Pareto k-hat {np.max(k):.2f} > {pareto_k_threshold}: "
                          f"unweighted Laplace draws). Give NUTS more time with "
                          f"nuts=NutsConfig(max_seconds=...) or method='nuts'",
                          ProbdeblendWarning, stacklevel=2)
        elif k is not None and np.max(k) > pareto_k_threshold:
            warnings.warn(f"{draws.method}: Pareto k-hat {np.max(k):.2f} > "
                          f"{pareto_k_threshold}; the importance-sampled draws are unreliable "
                          f"(use method='nuts' or method='auto')", ProbdeblendWarning,
                          stacklevel=2)
    return idata
