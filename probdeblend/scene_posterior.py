"""The staged public API under :func:`probdeblend.fit`: one scene, its sources, their posterior.

::

    post = ScenePosterior(scene, prior="lsst-vae")     # sources: scene.positions or detect()
    d = post.amortized(num_samples=1000, seed=0)        # q's own draws (fast path)
    d = post.laplace(num_samples=1000, seed=0)          # MAP + Laplace + PSIS (exact-ish)
    d = post.nuts(NutsConfig(), seed=0)                 # reference
    idata = post.to_inference_data(d)                   # ArviZ (probdeblend.results schema)

Every engine returns :class:`Draws` on the model's flat site vector (``latent_base``,
``log_flux``, ``offset``; :mod:`probdeblend.model`), so measurement, predictive checks and the
ArviZ result are one code path. The engines themselves live in :mod:`probdeblend.inference`;
this module only assembles a scene's problem and hands it to them.

Conventions: flux in the image's units (total flux of the PSF-convolved galaxy); ``e1``,
``e2`` GalSim reduced shear of the PSF-free galaxy (:mod:`probdeblend.measure`); positions in
the Scene's 0-based pixel convention.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError, ProbdeblendError, ProbdeblendWarning
from .measure import half_eta_to_shear, shear_to_half_eta
from .photometry import Systematic, systematic_noise
from .scene import Scene

__all__ = ["ScenePosterior", "Draws", "NutsConfig", "SviConfig", "LaplaceConfig",
           "LADDER_NUTS_SECONDS", "PriorCache", "PRIORS"]


@dataclass(frozen=True)
class NutsConfig:
    """NUTS settings (:func:`probdeblend.inference.run_nuts`): dense mass matrix from the
    Laplace covariance, step size adapted in ``num_warmup``; ``chain_method`` (NumPyro engine)
    ``"auto"`` runs one chain per CPU core at once (``"threaded"``, ~2x faster on 2 cores than
    ``"sequential"``, ~0.8 GB more memory; :func:`~probdeblend.inference.run_nuts`) and
    vectorises them on an accelerator. ``num_warmup``
    150: the mass matrix is fixed (the Laplace covariance), so the warm-up only adapts the
    step size (2 chains of 100 warm-up gave max R-hat 1.05 over the benchmark's NUTS
    scenes). ``max_seconds``: a budget on the sampling time (NumPyro engine; projected after
    each compiled segment of ~25 iterations, :func:`~probdeblend.inference.run_nuts`), over
    which NUTS stops with :class:`~probdeblend.errors.BudgetExceededError`; None: no budget,
    except on :func:`probdeblend.fit`'s ``auto`` ladder, whose NUTS rung then gets
    :data:`LADDER_NUTS_SECONDS` and keeps the laplace draws when it runs out."""

    num_warmup: int = 150
    num_chains: int = 4
    max_tree_depth: int = 8
    target_accept: float = 0.8
    engine: str = "numpyro"
    chain_method: str = "auto"
    max_seconds: float | None = None


#: the ``auto`` ladder's NUTS budget in seconds of sampling when ``NutsConfig.max_seconds`` is
#: None (on 2 CPU cores a 2-galaxy scene's 4 x (150 + 50) iterations take ~150-250 s one chain
#: at a time, about half that with the chains on threads, the CPU default)
LADDER_NUTS_SECONDS = 120.0


@dataclass(frozen=True)
class SviConfig:
    """SVI settings (:func:`probdeblend.inference.run_svi`): full-rank Gaussian guide."""

    num_steps: int = 1000
    lr: float = 0.01


#: how :meth:`ScenePosterior.laplace` measures each draw's e1, e2 (:class:`LaplaceConfig`)
LAPLACE_SHAPES = ("auto", "linear", "decoded")


@dataclass(frozen=True)
class LaplaceConfig:
    """Laplace + PSIS settings (:func:`probdeblend.inference.run_laplace`).

    ``proposal`` ``"t"`` (multivariate Student-t with ``df`` degrees of freedom, heavier tails
    than the posterior: safer importance weights) or ``"gaussian"``; ``n_proposals`` draws
    (default ``max(num_samples, 400)``) are Pareto-smoothed and resampled; above ``k_max``
    the plain Laplace draws are returned (flagged in ``method``). ``hessian``
    ``"gauss-newton"`` (default: ``J^T W J`` of the model image plus the prior's curvature,
    PSD, 0.4-0.8 s for a 2-4 source scene on 2 cores) or ``"exact"`` (forward-over-reverse,
    7-15 s); the MAP's L-BFGS is preconditioned with the same Gauss-Newton curvature.

    ``flux_sys``: the model-error term of the fluxes: the prior's galaxies and the PSF images
    are approximations, and at high S/N that percent-level error dominates the photon noise
    that the Laplace width measures, more so for a blended source, whose flux also takes up
    its neighbours' morphology errors. A :class:`probdeblend.photometry.Systematic` is
    applied to the draws with :meth:`~probdeblend.photometry.Systematic.perturb`, with each
    source's blendedness and footprint chi^2 at the MAP (:meth:`ScenePosterior.
    map_diagnostics`); a float is ``Systematic(flux_sys, power=0, df=flux_sys_df)``: every
    draw's fluxes are moved by ``flux_sys * flux * u``, one Student-t ``u`` per source and
    draw shared by its bands. ``None`` (default): the encoder card's
    ``calibration.laplace`` (``benchmarks/calibrate_photometry.py --laplace --blend-model``,
    fitted by maximum likelihood on every source of held-out simulations), none without
    one; 0 turns it off.

    ``shape_sys``: the model-error term of the shapes, the same idea for e1, e2: every draw's
    half conformal shear ``eta / 2`` (:meth:`ScenePosterior.linearised_shapes`) gets
    ``shape_sys * u`` added, ``u`` two independent Student-t (``shape_sys_df`` degrees of
    freedom) per source and draw. The prior's galaxies are not the sky's: at high S/N the
    shape they fit is off from the true one by more than the photon noise. ``None``
    (default): the encoder card's ``calibration.laplace`` (``shape_sys``, ``shape_df``;
    ``benchmarks/calibrate_photometry.py --laplace``), none without one; 0 turns it off.

    ``shapes``: how each draw's e1, e2 are measured. ``"linear"``: to first order around the
    MAP (:meth:`ScenePosterior.linearised_shapes`; no decode per draw); ``"decoded"``: the
    decoded galaxy of every draw; ``"auto"`` (default): decoded for PSIS-weighted draws
    (k-hat below ``k_max``: they are the posterior's), linear for the unweighted Laplace draws
    (the Gaussian is too wide in latent directions where the likelihood is flat at the MAP,
    and their decoded shapes shrink e by ~6 %: m -0.065 against the true g on 29 benchmark
    blends, -0.007 linear, +0.009 NUTS; docs/inference.md).
    """

    proposal: str = "t"
    df: float = 7.0
    n_proposals: int | None = None
    map_max_iter: int = 500
    k_max: float = 0.7
    hessian: str = "gauss-newton"
    flux_sys: float | Systematic | None = None
    flux_sys_df: float | None = None
    shape_sys: float | None = None
    shape_sys_df: float | None = None
    shapes: str = "auto"


@dataclass
class Draws:
    """Posterior draws of one engine.

    Attributes
    ----------
    flat : ndarray (chain, draw, dim) or None
        Draws of the flat site vector (None when an engine gives only derived quantities).
    method : str
        What actually ran (e.g. ``"amortized"``, ``"laplace+psis"``, ``"nuts"``).
    library : str
        ``"probdeblend"`` (own engines), ``"numpyro"``, ``"pyro"``.
    sample_stats : dict name -> (chain, draw)
    info : dict
        Diagnostics: ``pareto_k`` per scene or source, ESS of the weights, MAP log p, ...
    timings : dict name -> seconds
    extra : dict name -> (chain, draw, ...)
        Quantities an engine gives directly (the amortized ``e`` draws, ``flux``, positions;
        ``morph``: the index into ``templates`` that each draw's flux was solved with).
    templates : ndarray (M, S, band, y, x) or None
        Unit-flux model images of every source for ``M`` morphology draws, when the fluxes
        were solved by :meth:`ScenePosterior.photometry`. Then a draw's model image is
        linear, ``sum_s flux_s * templates[morph, s]``, and the predictive images, deblended
        images and log-likelihoods of every draw cost no render.
    """

    flat: np.ndarray | None
    method: str
    library: str = "probdeblend"
    sample_stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    templates: np.ndarray | None = None


class PriorCache:
    """Priors loaded by name, with their NumPyro twins and compiled log-densities.

    :data:`PRIORS` is the process-wide instance that :func:`probdeblend.fit` uses; call
    ``PRIORS.clear()`` to free the memory (the next fit reloads and recompiles).
    """

    def __init__(self):
        self._priors: dict = {}
        self._backends: dict = {}
        self._encoders: dict = {}

    def prior(self, prior):
        """A loaded :class:`~probdeblend.priors.LearnedPrior` from a name, path or itself."""
        from .priors.distribution import LearnedPrior
        from .priors.io import load_prior

        if isinstance(prior, LearnedPrior):
            return prior
        if prior not in self._priors:
            self._priors[prior] = load_prior(prior)
        return self._priors[prior]

    def backend(self, prior):
        """(numpyro twin, NumPyro Backend) of a loaded prior, built once per prior object."""
        from .model import Backend

        key = id(prior)
        if key not in self._backends:
            np_prior = prior.to_numpyro()
            backend = Backend.numpyro(np_prior)
            backend.torch_prior = prior
            self._backends[key] = (prior, np_prior, backend)
        return self._backends[key][1:]

    def encoder(self, prior):
        """The amortized encoder shipped for ``prior`` or None (with a warning)."""
        key = id(prior)
        if key not in self._encoders:
            from .amortized import AmortizedPosterior

            try:
                self._encoders[key] = (prior, AmortizedPosterior.for_prior(prior))
            except ProbdeblendError:
                warnings.warn(f"no amortized encoder is shipped for prior {prior.name!r}: "
                              f"starting from sep fluxes and z = 0 (slower; the amortized "
                              f"path is unavailable)", ProbdeblendWarning, stacklevel=3)
                self._encoders[key] = (prior, None)
        return self._encoders[key][1]

    def clear(self) -> None:
        self._priors.clear()
        self._backends.clear()
        self._encoders.clear()


#: The process-wide cache used by :func:`probdeblend.fit` (see :class:`PriorCache`).
PRIORS = PriorCache()


def prepare_scene(scene: Scene, prior) -> Scene:
    """The scene restricted to the prior's bands, in the prior's order (BandMismatchError
    naming the missing bands otherwise)."""
    if not isinstance(scene, Scene):
        from .errors import ArgumentTypeError

        raise ArgumentTypeError(
            "scene", scene, "a probdeblend.Scene; build one with probdeblend.Scene(image, "
                            "variance, psf, bands, pixel_scale) or Scene.from_fits(path)")
    missing = [b for b in prior.bands if b not in scene.bands]
    if missing:
        from .errors import BandMismatchError

        raise BandMismatchError(
            "bands", f"the prior {prior.name!r} needs bands {list(prior.bands)} but the scene "
                     f"lacks {missing}; load a prior with bands=... that the scene has")
    return scene.select_bands(prior.bands) if tuple(scene.bands) != tuple(prior.bands) else scene


def find_sources(scene: Scene, positions=None, detect_kwargs: dict | None = None):
    """Source positions ``(S, 2)`` and the detection table (None when positions were given).

    ``positions`` (or ``scene.positions``) wins; otherwise :func:`probdeblend.detection.detect`.
    An explicit empty ``positions`` is an error, not "detect".
    """
    from .detection import detect
    from .errors import PositionError

    given = positions if positions is not None else scene.positions
    if given is not None:
        pos = np.asarray(given, dtype=np.float64).reshape(-1, 2)
        if len(pos) == 0:
            raise PositionError("positions", "is empty; pass at least one (x, y) or None to "
                                             "detect sources")
        return pos, None
    table = detect(scene, **(detect_kwargs or {}))
    if len(table) == 0:
        raise ProbdeblendError("no source was detected in the scene; pass positions= (x, y) "
                               "or lower the detection threshold (detect_kwargs)")
    return np.stack([table["x"], table["y"]], -1).astype(np.float64), table


def _warn_coincident(positions, min_sep: float = 1.0):
    d = np.hypot(*(positions[:, None] - positions[None]).transpose(2, 0, 1))
    i, j = np.nonzero(np.triu(d < min_sep, 1))
    if len(i):
        pairs = [(int(a), int(b)) for a, b in zip(i, j, strict=True)][:5]
        warnings.warn(f"sources {pairs} are closer than {min_sep} pixel: the model cannot tell "
                      f"them apart and will split the flux between them; merge them or check "
                      f"the positions", ProbdeblendWarning, stacklevel=3)


class ScenePosterior:
    """Posterior of every source of one scene under a learned prior.

    Parameters
    ----------
    scene : Scene
        The observation; bands beyond the prior's are ignored.
    prior : str or LearnedPrior
        Shipped prior name (``"lsst-vae"``, ``"lsst-vaegan"``), a path, or a loaded prior.
    positions : array (S, 2), optional
        Source ``(x, y)`` pixels; default ``scene.positions``, else detection.
    encoder : AmortizedPosterior, "auto" or None
        The amortized encoder (``"auto"``: the one shipped for the prior, if any).
    detect_kwargs : dict, optional
        Passed to :func:`probdeblend.detection.detect`.
    residual_pass : bool
        After detection, look once for sources the detector merged or missed in the residual
        of the amortized model.
    flux_scale, position_scale : float
        Widths of the log-flux prior (natural log) and of the position prior (pixels).
    model_error : float
        Fractional model error added to the pixel noise (:meth:`probdeblend.model.SceneSpec.
        build`); 0 (default) is the pure pixel-noise likelihood.
    cache : PriorCache
        Where priors, twins and compiled functions are kept (default :data:`PRIORS`).
    """

    def __init__(self, scene: Scene, prior="lsst-vae", positions=None, *, encoder="auto",
                 detect_kwargs: dict | None = None, residual_pass: bool = True,
                 flux_scale: float = 2.0, position_scale: float = 1.0,
                 model_error: float = 0.0, cache: PriorCache | None = None):
        self.cache = PRIORS if cache is None else cache
        self.prior = self.cache.prior(prior)
        self.scene = prepare_scene(scene, self.prior)
        self.np_prior, self.backend = self.cache.backend(self.prior)
        self.encoder = self.cache.encoder(self.prior) if encoder == "auto" else encoder
        self.flux_scale, self.position_scale = float(flux_scale), float(position_scale)
        self.model_error = float(model_error)
        t0 = time.perf_counter()
        pos, self.detections = find_sources(self.scene, positions, detect_kwargs)
        _warn_coincident(pos)
        self._build(pos)
        if self.detections is not None and residual_pass:
            self._residual_pass()
        self.timings = {"amortized_s": time.perf_counter() - t0}
        self._map = None
        self._map_diag = None

    # -- construction ----------------------------------------------------------------------
    def _build(self, positions):
        from .inference import SceneProblem
        from .model import SceneSpec, magnitude_context
        from .render import SceneRenderer

        self.renderer = SceneRenderer.from_scene(self.scene, self.prior.frame)
        self._q_mean_templates = None  # unit-flux images at q's mean, rendered once per build
        self._refined = {}  # refine iterations -> (re-centred q, info)
        if self.encoder is not None:
            self.q = self.encoder.predict_q(self.scene, positions)
        else:
            self.q = _fallback_q(self.scene, self.prior, positions)
        self.positions0 = self.q.centres + self.q.mean("offset")
        flux0 = np.exp(self.q.mean("log_flux"))
        self.spec = SceneSpec.build(self.backend, self.scene, self.renderer, self.positions0,
                                    flux0, self.prior.latent_dim, flux_scale=self.flux_scale,
                                    position_scale=self.position_scale,
                                    model_error=self.model_error,
                                    magnitude=magnitude_context(self.prior, self.scene))
        self.problem = SceneProblem(self.backend, self.spec)
        u = self._to_base(self.q.mean("z"), self.q.mean("log_flux"))
        self.init = {"latent_base": np.asarray(u), "log_flux": self.q.mean("log_flux"),
                     "offset": np.zeros_like(self.positions0)}

    def _to_base(self, z, log_flux) -> np.ndarray:
        """The model's whitened latent ``u (..., S, D)`` of latents ``z`` given log fluxes
        ``(..., S, band)`` (which set the magnitude of a magnitude-conditioned prior)."""
        import jax.numpy as jnp

        z = np.asarray(z, np.float32)
        mag = self.spec.magnitude(jnp.asarray(np.asarray(log_flux, np.float32)), jnp)
        mag = None if mag is None else np.asarray(mag).reshape(-1)
        u = self.np_prior.twin.flow_inverse(z.reshape(-1, z.shape[-1]), mag)[0]
        return np.asarray(u, np.float64).reshape(z.shape)

    def q_mean_model(self, photometry: bool = True) -> np.ndarray:
        """Noiseless model image (band, y, x) of every source at q's mean morphology and
        position, with the closed-form photometric fluxes of that morphology
        (:meth:`photometry`, clipped at 1e-3; ``photometry=False``: q's mean fluxes). The
        residual then measures how well q's *morphology* explains the data (the ``auto``
        ladder's check, the residual detection pass)."""
        flux = self._q_mean_flux() if photometry else np.exp(self.q.mean("log_flux"))
        return np.einsum("sb,sbyx->byx", flux, self.q_mean_templates())

    def _q_mean_flux(self) -> np.ndarray:
        """Photometric fluxes ``(S, band)`` of q's mean morphology, clipped at 1e-3."""
        from .photometry import linear_fluxes

        flux = linear_fluxes(self.q_mean_templates()[None], self.scene.image,
                             self.scene.weight)[0][0].T
        return np.clip(flux, 1e-3, None)

    def _decoded_shapes(self, z, batch: int = 1024):
        """PSF-corrected adaptive-moment shapes ``(e1, e2)`` of decoded latents ``z (..., D)``
        (band-averaged stamps, :func:`probdeblend.measure.psf_corrected_shape_fast`), each
        shaped like ``z[..., 0]``; NaN where the measurement fails."""
        from .measure import model_psf_sigma_pix, psf_corrected_shape_fast

        z = np.asarray(z, np.float32)
        flat = z.reshape(-1, z.shape[-1])
        sig = model_psf_sigma_pix(self.prior.frame)
        e1, e2 = np.empty(len(flat)), np.empty(len(flat))
        for i in range(0, len(flat), batch):
            stamps = self.prior.decode_numpy(flat[i:i + batch]).mean(-3)
            e1[i:i + batch], e2[i:i + batch] = psf_corrected_shape_fast(stamps, sig)
        return e1.reshape(z.shape[:-1]), e2.reshape(z.shape[:-1])

    def linearised_shapes(self, flat_map, flat, step: float = 0.5):
        """Shapes ``(e1, e2)`` of draws ``flat (..., dim)`` to first order around ``flat_map``.

        Each source's measured shape (:meth:`_decoded_shapes`, the PSF-free galaxy's reduced
        shear) depends on its own latent base and, for a magnitude-conditioned prior, its log
        flux in the prior's magnitude band. Its Jacobian in those flat coordinates is taken by
        central differences of ``step`` times each coordinate's spread over the draws (so the
        slope is the secant at the posterior's own scale), in half the conformal shear,
        ``eta / 2 = e atanh|e| / |e|`` (unbounded, so every draw keeps ``|e| < 1``). A draw's
        shape is then ``eta_map / 2 + J (x - x_map)`` mapped back to e: no decode per draw
        (2 (D + 1) + 1 decodes per source, all in one batch).

        Why: a Gaussian (Laplace) cloud in the latent is too wide in directions where the
        likelihood is flat at the MAP but grows fast away from it (the decoder's image moves
        at second order), and the galaxies decoded there are rounder. Measured on isolated
        galaxies, where importance sampling is exact (k-hat < 0.7), the linearised median e
        is 0.005 from the exact one and decoded Laplace draws 0.018, shrunk by 5 %
        (``benchmarks/laplace_shapes.py``); on 200 blends m is -0.007 linearised against
        -0.061 decoded (NUTS +0.02 on 30; docs/inference.md). Sources whose shape cannot be
        measured at the MAP or around it get their decoded draws' shapes instead.
        """
        x0 = np.asarray(flat_map, np.float64)
        flat = np.asarray(flat, np.float64)
        lead = flat.shape[:-1]
        xs = flat.reshape(-1, flat.shape[-1])
        S, D = self.problem.template["latent_base"].shape
        B = self.problem.template["log_flux"].shape[1]
        mb = int(self.problem.spec.mag_band)  # the log flux the latent prior sees, if any
        cols = np.arange(S)[:, None] * D + np.arange(D)[None]  # (S, n) each source's coords
        if mb >= 0:
            cols = np.concatenate([cols, S * D + np.arange(S)[:, None] * B + mb], 1)
        n = cols.shape[1]
        h = step * np.maximum(xs.std(0), 1e-3)[cols]  # (S, n)
        si, ki = np.arange(S)[:, None], np.arange(n)[None]
        probes = np.repeat(x0[None, None, None], S * n * 2, 0).reshape(S, n, 2, -1)
        probes[si, ki, 0, cols] += h
        probes[si, ki, 1, cols] -= h
        lat = self.problem.deterministic(np.concatenate([x0[None], probes.reshape(S * n * 2, -1)]))[
            "latent"]  # (1 + S n 2, S, D)
        own = lat[1:].reshape(S, n, 2, S, D)[np.arange(S), :, :, np.arange(S)]  # (S, n, 2, D)
        e = np.stack(self._decoded_shapes(np.concatenate([lat[0], own.reshape(-1, D)])), -1)
        eta0, eta_p = shear_to_half_eta(e[:S]), shear_to_half_eta(e[S:]).reshape(S, n, 2, 2)
        J = (eta_p[:, :, 0] - eta_p[:, :, 1]) / (2 * h[..., None])  # (S, n, 2)
        out = half_eta_to_shear(eta0 + np.einsum("isn,snc->isc", xs[:, cols] - x0[cols], J))
        bad = ~(np.isfinite(eta0).all(-1) & np.isfinite(eta_p).all((1, 2, 3)))
        if bad.any():  # shapes not measurable at or around the MAP: decode those sources
            d = self._decoded_shapes(self.problem.deterministic(xs)["latent"][:, bad])
            out[:, bad] = np.stack(d, -1)
        return out[..., 0].reshape(lead + (S,)), out[..., 1].reshape(lead + (S,))

    def q_mean_templates(self) -> np.ndarray:
        """Unit-flux model images ``(S, band, y, x)`` of every source at q's mean latent and
        position (:meth:`flux_templates`), rendered once and kept until the sources change."""
        if self._q_mean_templates is None:
            self._q_mean_templates = self.flux_templates(self.q.mean("z")[None],
                                                         self.positions0[None])[0]
        return self._q_mean_templates

    def _residual_pass(self):
        from .detection import detect_residual

        new = detect_residual(self.scene, self.q_mean_model(), self.positions0)
        if len(new):
            self._build(np.concatenate([self.positions0, np.stack([new["x"], new["y"]], -1)]))

    @property
    def n_sources(self) -> int:
        return int(self.spec.n_sources)

    # -- engines ---------------------------------------------------------------------------
    def amortized(self, num_samples: int = 1000, seed: int = 0, photometry: bool = True,
                  n_morph: int = 8, refine: int = 0) -> Draws:
        """q's own draws, no reweighting (calibrated by training; see
        :mod:`probdeblend.amortized.npe`). Position and, with a shape head, ``e`` come straight
        from q (no decode per draw); the flat vector is filled too (latent through the inverse
        flow), for predictive checks and deblended images.

        ``photometry=True`` (default) replaces q's flux by the exact flux posterior *given the
        morphology* (:meth:`photometry`, ``n_morph`` morphology draws of q): fluxes enter the
        model linearly, so given the galaxies' shapes and positions their posterior under the
        pixel likelihood is Gaussian and solved in closed form. This is what the encoder finds
        hardest (v0.2: q's r-flux NMAD 18-30 % against ~2 % for the MAP) and costs one decode
        per morphology draw, not per posterior draw. Flux draws can then be <= 0 (a source
        consistent with zero flux); ``log_flux`` in the flat vector is floored at 1e-3.

        ``refine > 0``: first ``refine`` L-BFGS iterations of the whole scene's log posterior
        from q's mean (fluxes started at their photometric values; :meth:`refined`), then q
        is re-centred there (:meth:`AmortizedQ.recentred`: latent and offset at the refined
        values, e shifted by the change of the decoded galaxy's measured shape; widths
        unchanged) and drawn as above, with the systematic calibrated for refined
        morphologies. q's mean morphology loses a few per cent of the flux that the MAP's
        recovers; 40 iterations (~1 s for a 2-4 source 80x80 scene on 2 cores) close most of
        that gap. ``method`` is then ``"amortized+refine+photometry"``.
        """
        if self.encoder is None:
            raise ProbdeblendError(
                f"no amortized encoder for prior {self.prior.name!r}; use method='laplace'")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        q, info = self.q, {"encoder": self.encoder.name}
        if refine:
            q, rinfo = self.refined(int(refine))
            info.update(rinfo)
        d = q.sample(num_samples, rng)
        extra, templates = {}, None
        if photometry:
            ph = self.photometry(num_samples, n_morph=n_morph, rng=rng, q_draws=d,
                                 q=q if refine else None)
            extra["flux"] = ph["flux"][None]
            extra["morph"] = ph["morph"][None]
            templates = ph["templates"]
            d["log_flux"] = np.log(np.clip(ph["flux"], 1e-3, None))
            info.update(photometry_chi2=ph["chi2"], photometry_inflation=ph["inflation"])
        u = self._to_base(d["z"], d["log_flux"])
        flat = self.problem.flatten_draws({
            "latent_base": u, "log_flux": d["log_flux"],
            "offset": d["position"] - self.positions0[None]})
        if "e" in d:
            extra.update(e1=d["e"][None, ..., 0], e2=d["e"][None, ..., 1])
        method = "amortized" + ("+refine" if refine else "") + ("+photometry" if photometry
                                                                 else "")
        return Draws(flat[None], method, "probdeblend", info=info,
                     timings={"draws_s": time.perf_counter() - t0}, extra=extra,
                     templates=templates)

    def refined(self, max_iter: int = 40):
        """q re-centred on a refined morphology: ``(AmortizedQ, info)``, cached per
        ``max_iter``.

        ``max_iter`` L-BFGS iterations (:func:`probdeblend.inference.find_map`) of the whole
        scene's log posterior, from q's mean latent and position and the photometric fluxes
        of q's mean morphology. The result's latent and offset become q's means; q's e mean
        moves by the change in the PSF-corrected adaptive-moment shape
        (:func:`probdeblend.measure.psf_corrected_shape_fast`) between the decoded refined and
        q-mean galaxies (the shape head predicts that measurement). The encoder card's
        ``calibration.q_widths_refined`` (``benchmarks/calibrate_q.py --refine``), when
        present, rescales the re-centred q's widths. Info: ``refine_iter``,
        ``refine_logp`` (before, after) and ``refine_s``.
        """
        from .inference import find_map

        key = int(max_iter)
        if key in self._refined:
            return self._refined[key]
        t0 = time.perf_counter()
        x0 = self._photometric_start()
        flat, info = find_map(self.problem, None, max_iter=key, x0=x0)
        det = self.problem.deterministic(np.stack([x0, flat]))
        locs = {"z": det["latent"][1], "offset": det["position"][1] - self.q.centres}
        if "e" in self.q.groups:  # before (q's mean) and after the refinement: (2, S, 2)
            de = np.stack(self._decoded_shapes(det["latent"]), -1)
            shift = np.where(np.isfinite(de[1] - de[0]), de[1] - de[0], 0.0)
            locs["e"] = self.q.mean("e") + shift
        logp0 = float(self.problem.logp(x0.astype(np.float32)))
        q = self.q.recentred(**locs)
        card = getattr(self.encoder, "card", None) or {}
        widths = (card.get("calibration") or {}).get("q_widths_refined")
        if widths:  # refined centres are closer to the truth than q's: their own widths
            q = q.rescaled(widths)
        out = (q,
               {"refine_iter": info["map_iterations"], "refine_logp": [logp0, info["map_logp"]],
                "refine_s": time.perf_counter() - t0})
        self._refined[key] = out
        return out

    def flux_templates(self, z, positions, chunk: int = 16) -> np.ndarray:
        """Unit-flux model images ``(M, S, band, y, x)`` of every source for ``M`` morphology
        draws: latents ``z (M, S, D)`` and scene positions ``(M, S, 2)`` (pixels). Decoded and
        rendered in one compiled call per ``chunk`` stamps (padded), so a new number of
        sources or draws compiles nothing new."""
        z = np.asarray(z, np.float32)
        m, s = z.shape[:2]
        zf = z.reshape(m * s, -1)
        pf = np.asarray(positions, np.float32).reshape(m * s, 2)
        fn = _template_fn(self.np_prior.twin, self.renderer.image_shape)
        args = (self.renderer.kernel_ft.astype(np.complex64),
                *(f.astype(np.float32) for f in self.renderer.freqs))
        out = []
        for i in range(0, len(zf), chunk):
            zc, pc = zf[i:i + chunk], pf[i:i + chunk]
            n = len(zc)
            if n < chunk:  # one compiled shape
                zc = np.concatenate([zc, np.repeat(zc[-1:], chunk - n, 0)])
                pc = np.concatenate([pc, np.repeat(pc[-1:], chunk - n, 0)])
            out.append(np.asarray(fn(zc, pc, *args), np.float64)[:n])
        img = np.concatenate(out)
        return img.reshape(m, s, *img.shape[1:])

    def photometry(self, num_samples: int = 1000, n_morph: int = 8, rng=None,
                   q_draws: dict | None = None, flux_sys: float | None = None,
                   q=None, redistribute: float | str | None = "auto") -> dict:
        """Flux posterior of every source given the morphology, in closed form.

        For each of ``n_morph`` morphology draws from q (the first is q's mean; latent and
        position; ``q``: another AmortizedQ of these sources, e.g. :meth:`refined`'s, whose
        systematic is then looked up as refined), the unit-flux templates ``T_s`` of all
        sources are rendered through the scene's PSFs; per band, the fluxes ``f`` that
        maximise the pixel likelihood solve
        ``(T W T^T) f = T W image`` (``W`` = inverse variance), with Gaussian covariance
        ``(T W T^T)^-1`` (flat prior on ``f``, so negative fluxes are allowed: a source on pure
        noise gets an interval that includes 0). Where the fit leaves a residual larger than
        the noise in a source's footprint (a galaxy the prior only approximates), that
        source's covariance is multiplied by the footprint's reduced chi^2 (>= 1). Draws are
        a mixture over the morphology draws.

        ``flux_sys``: the fractional error of q's morphology that the draws do not cover, one
        relative error per source shared by its bands, of scale ``flux_sys * flux *
        inflation ** (power / 2)`` (larger where the footprint chi^2 says the morphology fits
        worse), Student-t with ``df`` degrees of freedom. ``None`` takes the encoder card's
        calibrated error model for this ``n_morph`` (:class:`probdeblend.photometry.
        Systematic`, :func:`probdeblend.photometry.systematic_of`; fitted on simulated scenes
        held out from the benchmark by ``benchmarks/calibrate_photometry.py``), else none; a
        number given here is used with ``power`` 1 and a Gaussian tail. The algebra is
        :mod:`probdeblend.photometry`.

        ``redistribute``: each source also gets its share of the fit's residual in its
        footprint (template above this fraction of its peak), in proportion to the sources'
        fitted model images (flux conservation, :func:`probdeblend.photometry.linear_fluxes`):
        a template that misses part of the galaxy's light (q's mean morphology is a few per
        cent too compact on average) then no longer biases its flux low. ``"auto"``:
        :data:`probdeblend.photometry.REDISTRIBUTE` for q's own morphologies, ``None`` (the
        least-squares fluxes alone) for a refined ``q``, whose morphology fits the data.

        Returns a dict: ``flux`` (num_samples, S, band) in image units, ``chi2`` (S, band)
        footprint reduced chi^2 at q's mean morphology, ``inflation`` (S, band),
        ``blendedness`` (S,) at q's mean morphology (scales the error model's blend terms),
        ``mean``
        and ``cov`` (M, band, S[, S]) of each morphology draw (inflated, plus the
        systematic's scale squared), the error model as used (``flux_sys``, ``power``,
        ``df``, ``stat_scale``, ``tail``: :class:`probdeblend.photometry.Systematic`), ``morph``
        (num_samples,) the morphology draw of each flux draw, ``templates`` (M, S, band, y, x)
        the unit-flux images of the morphology draws.
        """
        from .photometry import (
            REDISTRIBUTE,
            flux_draws,
            linear_fluxes,
            model_blendedness,
            systematic_of,
        )

        rng = np.random.default_rng(0) if rng is None else rng
        n_morph = max(1, int(n_morph))
        refined = q is not None and q is not self.q
        q = self.q if q is None else q
        if refined:  # morphology 0 is the given q's mean
            tmpl = self.flux_templates(q.mean("z")[None], (q.centres + q.mean("offset"))[None])
        else:
            tmpl = self.q_mean_templates()[None]  # (M, S, B, y, x); morphology 0: q's mean
        if n_morph > 1:
            if q_draws is None or len(q_draws["z"]) < n_morph - 1:
                q_draws = q.sample(n_morph - 1, rng)
            tmpl = np.concatenate([tmpl, self.flux_templates(q_draws["z"][: n_morph - 1],
                                                             q_draws["position"][: n_morph - 1])])
        if isinstance(redistribute, str) and redistribute == "auto":
            redistribute = None if refined else REDISTRIBUTE
        if redistribute is not None and not (isinstance(redistribute, (int, float))
                                             and 0.0 <= float(redistribute) < 1.0):
            raise ArgumentError("redistribute", redistribute, "give 'auto', None or a "
                                "footprint fraction in [0, 1) such as 0.003")
        mean, cov, chi2 = linear_fluxes(tmpl, self.scene.image, self.scene.weight,
                                        redistribute)
        sys_ = (systematic_of(getattr(self.encoder, "card", None), n_morph, refined)
                if flux_sys is None else Systematic(float(flux_sys)))
        beta = model_blendedness(tmpl[0], mean[0])  # of morphology 0 (q's mean)
        d = flux_draws(mean, cov, chi2, num_samples, rng, *sys_, blendedness=beta)
        return {"flux": d["flux"], "chi2": chi2, "inflation": d["inflation"], "mean": mean,
                "blendedness": beta,
                "cov": d["cov"], **sys_._asdict(), "morph": d["morph"], "templates": tmpl,
                "redistribute": redistribute}

    def map(self, max_iter: int = 500):
        """MAP of the whole scene: ``(flat, info)``, cached. L-BFGS from q's mean latent and
        position with the photometric fluxes of q's mean morphology (:meth:`refined`'s
        start; q's own fluxes start up to 10^3-10^5 nats lower on bright scenes)."""
        if self._map is None:
            from .inference import find_map

            self._map = find_map(self.problem, None, max_iter=max_iter,
                                 x0=self._photometric_start(), precondition="gauss-newton")
        return self._map

    def map_diagnostics(self) -> dict:
        """How well the MAP explains each source, from the MAP's own model (cached).

        Returns a dict of arrays over sources:

        * ``blendedness`` (S,): ``1 - sum(m_s^2) / sum(m_s M)`` over all bands and pixels,
          with ``m_s`` the source's MAP model image and ``M`` the scene's (0: isolated,
          -> 1: buried under neighbours; :func:`probdeblend.measure.blendedness` on the model
          instead of the truth);
        * ``chi2`` (S, band): the reduced chi^2 of the data against the least-squares fluxes
          of the MAP morphology in each source's footprint (template above 5 % of its peak;
          ~1 where the model fits to the noise, :func:`probdeblend.photometry.
          linear_fluxes`);
        * ``snr`` (S, band): the MAP flux over its fixed-morphology standard error."""
        if self._map_diag is None:
            from .photometry import linear_fluxes

            flat, _ = self.map()
            det = self.problem.deterministic(np.asarray(flat)[None])
            tmpl = self.flux_templates(det["latent"], det["position"])  # (1, S, B, y, x)
            mean, cov, chi2 = linear_fluxes(tmpl, self.scene.image, self.scene.weight)
            from .measure import blendedness

            f = np.exp(det["log_flux"][0])  # (S, B)
            m = tmpl[0] * f[:, :, None, None]
            m = m.reshape(len(m), -1, m.shape[-1])  # bands stacked: one dot product over all
            S = len(m)
            blend = np.nan_to_num(np.array([blendedness(
                m[s], m[np.arange(S) != s])[0] for s in range(S)]), nan=0.0)
            sd = np.sqrt(np.einsum("bss->bs", cov[0])).T  # (S, B)
            self._map_diag = {"blendedness": blend, "chi2": chi2,
                              "snr": mean[0].T / np.where(sd > 0, sd, np.inf)}
        return self._map_diag

    def _photometric_start(self) -> np.ndarray:
        """Flat vector at q's mean latent and position with :meth:`_q_mean_flux`'s fluxes."""
        init = dict(self.init)
        if self.encoder is not None:
            init["log_flux"] = np.log(self._q_mean_flux())
        return self.problem.flatten(init)

    def laplace(self, num_samples: int = 1000, seed: int = 0,
                config: LaplaceConfig | None = None) -> Draws:
        """MAP + Laplace covariance + Pareto-smoothed importance sampling (k-hat in info)."""
        from .inference import run_laplace
        from .validate import check_choice

        cfg = config or LaplaceConfig()
        check_choice("config.shapes", cfg.shapes, LAPLACE_SHAPES)
        flat_map, map_info = self.map(cfg.map_max_iter)
        post = run_laplace(self.problem, flat_map, num_samples=num_samples, seed=seed,
                           proposal=cfg.proposal, df=cfg.df, n_proposals=cfg.n_proposals,
                           k_max=cfg.k_max, compute_lp=False, hessian=cfg.hessian)
        flat = post.samples["flat"][None]
        flux_model, (e_sys, e_df) = self._laplace_systematic(cfg)
        sys_on = not flux_model.is_identity
        extra = {}
        linear = cfg.shapes == "linear" or (cfg.shapes == "auto" and post.method != "laplace+psis")
        det = self.problem.deterministic(flat) if (sys_on or e_sys > 0) else None
        if linear:
            e1, e2 = self.linearised_shapes(flat_map, flat[0])
            extra["e1"], extra["e2"] = e1[None], e2[None]
        elif e_sys > 0:  # the decoded shapes now (measure would decode them anyway)
            extra["e1"], extra["e2"] = (e[None] for e in self._decoded_shapes(det["latent"][0]))
        rng = np.random.default_rng([int(seed), 1])
        if sys_on:
            diag = self.map_diagnostics()
            extra["flux"] = flux_model.perturb(np.exp(det["log_flux"]), rng,  # (1, n, S, B)
                                               diag["blendedness"], diag["chi2"])
        if e_sys > 0:  # in half the conformal shear: every draw keeps |e| < 1
            h = shear_to_half_eta(np.stack([extra["e1"], extra["e2"]], -1))
            e = half_eta_to_shear(h + e_sys * systematic_noise(rng, h.shape, e_df))
            extra["e1"], extra["e2"] = e[..., 0], e[..., 1]
        return Draws(flat, post.method, "probdeblend",
                     {k: v[None] for k, v in post.sample_stats.items()},
                     {**map_info, **post.info, "flux_sys": flux_model.flux_sys,
                      "flux_model": flux_model._asdict(), "shape_sys": e_sys,
                      "shapes": "linear" if linear else "decoded"},
                     post.timings, extra=extra)

    def _laplace_systematic(self, cfg: LaplaceConfig) -> tuple[Systematic,
                                                                tuple[float, float]]:
        """``(flux model, (shape_sys, shape_df))`` of the laplace posterior: the config's,
        else the encoder card's ``calibration.laplace``, else none. A card entry without
        ``tail`` (the earlier layout) is one fractional term without the footprint chi^2."""
        cal = ((getattr(self.encoder, "card", None) or {}).get("calibration") or {}).get(
            "laplace") or {}
        given = cfg.flux_sys
        if isinstance(given, Systematic):
            flux_model = given.check("config.flux_sys")
        elif given is not None or "tail" not in cal:
            df = cfg.flux_sys_df if cfg.flux_sys_df is not None else cal.get("df")
            flux_model = Systematic(float(given if given is not None
                                          else cal.get("flux_sys", 0.0)), power=0.0,
                                    df=np.inf if df is None else float(df)
                                    ).check("config.flux_sys")
        else:
            flux_model = Systematic.from_card(cal)
        e_sys = float(cfg.shape_sys if cfg.shape_sys is not None else cal.get("shape_sys", 0.0))
        e_df = cfg.shape_sys_df if cfg.shape_sys_df is not None else cal.get("shape_df")
        return flux_model, (e_sys, np.inf if e_df is None else float(e_df))

    def nuts(self, num_samples: int = 1000, seed: int = 0, config: NutsConfig | None = None,
             progress: bool = False) -> Draws:
        """NUTS over all sources jointly from the MAP, dense mass from the Laplace covariance."""
        from .inference import laplace, run_nuts, run_nuts_pyro

        cfg = config or NutsConfig()
        t0 = time.perf_counter()
        flat_map, map_info = self.map()
        cov = laplace(self.problem, flat_map)
        t_map = time.perf_counter() - t0
        runner = run_nuts if cfg.engine == "numpyro" else run_nuts_pyro
        extra = ({"chain_method": cfg.chain_method, "max_seconds": cfg.max_seconds}
                 if cfg.engine == "numpyro" else {})
        post = runner(self.problem, flat_map, cov, num_warmup=cfg.num_warmup,
                      num_samples=num_samples, num_chains=cfg.num_chains, seed=seed,
                      target_accept=cfg.target_accept, max_tree_depth=cfg.max_tree_depth,
                      progress=progress, **extra)
        return Draws(self.problem.flatten_draws(post.samples), "nuts", cfg.engine,
                     post.sample_stats, {**map_info, **post.info},
                     {"map_laplace_s": t_map, **post.timings})

    def svi(self, num_samples: int = 1000, seed: int = 0, config: SviConfig | None = None,
            progress: bool = False) -> Draws:
        """Full-rank Gaussian SVI over the whole scene, initialised from q."""
        from .inference import run_svi

        cfg = config or SviConfig()
        loc = self.problem.flatten(self.init)
        scale = self.problem.flatten({"latent_base": self.q.sd("z"),
                                      "log_flux": self.q.sd("log_flux"),
                                      "offset": self.q.sd("offset")})
        post = run_svi(self.problem, loc, np.diag(scale**2), num_steps=cfg.num_steps,
                       num_samples=num_samples, seed=seed, lr=cfg.lr, progress=progress)
        return Draws(self.problem.flatten_draws(post.samples), "svi", "numpyro",
                     post.sample_stats, {k: v for k, v in post.info.items() if k != "elbo"},
                     post.timings)

    # -- measurement and results -----------------------------------------------------------
    def measure(self, draws: Draws, batch: int = 1024) -> dict:
        """Posterior variables (chain, draw, ...) of draws: ``flux`` (source, band), ``e1``,
        ``e2``, ``x_pix``, ``y_pix`` (source), ``latent``, ``log_flux``; plus
        ``e_failed`` (source): the fraction of draws whose shape could not be measured (their
        e1 / e2 are NaN and summaries skip them)."""
        det = self.problem.deterministic(draws.flat)
        shapes = None if "e1" in draws.extra else self._decoded_shapes(det["latent"], batch)
        return self._variables(draws, det, shapes)

    @staticmethod
    def _variables(draws: Draws, det: dict, shapes=None) -> dict:
        """:meth:`measure`'s dict from the draws' deterministic sites and, for draws without
        their own e1 / e2, the decoded shapes ``(e1, e2)``."""
        flux = draws.extra["flux"] if "flux" in draws.extra else np.exp(det["log_flux"])
        out = {"flux": flux, "x_pix": det["position"][..., 0],
               "y_pix": det["position"][..., 1], "latent": det["latent"],
               "log_flux": det["log_flux"]}
        out["e1"], out["e2"] = ((draws.extra["e1"], draws.extra["e2"]) if shapes is None
                                else shapes)
        return out

    def _source_boxes(self, z, log_flux, positions):
        """Each source's model image of ``n`` draws in its own box: ``(boxes (n, S, band, L,
        L), origins (n, S, 2) int (scene x, y of box pixel [0, 0]), band-averaged
        model-frame stamps (n, S, m, m))``, boxes in float32. One decode per source and draw
        (the torch prior forward-only, :meth:`LearnedPrior.decode_numpy`: on CPU 0.5-0.8 ms per
        stamp against 1.6 ms for the JAX twin, which is built for gradients inside compiled
        loops; they agree to float32), rendered through the scene's PSFs on a box of the
        stamp plus the PSF (:func:`probdeblend.photometry.local_templates`: the scene
        renderer's forward model,
        ~4x fewer pixels per FFT than the whole padded 80x80 scene), times its fluxes."""
        from .photometry import local_templates

        z = np.asarray(z, np.float32)
        n, S = z.shape[:2]
        stamps = self.prior.decode_numpy(z.reshape(n * S, -1))
        tmpl, origins = local_templates(stamps, np.asarray(positions).reshape(n * S, 2),
                                        self.scene.unit_flux_psf, self.prior.frame.psf_image(
                                            self.scene.psf.shape[-1]))
        tmpl *= np.exp(np.asarray(log_flux, np.float64)).astype(np.float32).reshape(
            n * S, -1, 1, 1)  # in place: the boxes are the largest arrays here
        return (tmpl.reshape((n, S) + tmpl.shape[1:]), origins.reshape(n, S, 2),
                stamps.mean(-3).reshape((n, S) + stamps.shape[-2:]))

    def _draw_batch(self) -> int:
        """Draws rendered per batch: up to 64, with at most ~20 M floats of boxes and model
        images (bounds the memory of large scenes)."""
        size = self.prior.frame.stamp_size + self.scene.psf.shape[-1]  # ~ a box's side
        per = self.spec.n_bands * (self.n_sources * size**2 + int(np.prod(self.spec.image_shape)))
        return int(np.clip(2e7 // max(per, 1), 1, 64))

    @staticmethod
    def _paste_sources(boxes, origins, s1, s2, model=None) -> None:
        """Add :meth:`_source_boxes` of ``n`` draws into the per-source sums ``s1`` and
        ``s2`` (of the image and its square, (S, band, y, x)) and, if given, into each draw's
        scene ``model (n, band, y, x)``."""
        from .photometry import add_box

        for k in range(boxes.shape[0]):
            for s in range(boxes.shape[1]):
                add_box(s1[s], boxes[k, s], origins[k, s])
                add_box(s2[s], boxes[k, s] ** 2, origins[k, s])
                if model is not None:
                    add_box(model[k], boxes[k, s], origins[k, s])

    def _rendered_products(self, draws: Draws, n_predictive: int | None, seed: int):
        """Everything :meth:`to_inference_data` needs from draws without ``templates``, in
        one pass that decodes every draw once: the variables of :meth:`measure` (decoded
        shapes unless the draws carry e1 / e2), the log-likelihood and replicated images of
        :meth:`predictive`, and the mean / std of every source's image over *all* draws
        (:meth:`source_images` averages up to ``max_draws``). Separately those decode each
        draw two to three times."""
        from .likelihood import loglike_per_band
        from .measure import model_psf_sigma_pix, psf_corrected_shape_fast

        spec, det = self.spec, self.problem.deterministic(draws.flat)
        C, N, S = det["log_flux"].shape[:3]
        sigma, image = (np.asarray(a, np.float64) for a in (spec.sigma, spec.image))
        good = np.asarray(spec.good, bool)
        need_e = "e1" not in draws.extra
        e1, e2 = np.full((C, N, S), np.nan), np.full((C, N, S), np.nan)
        ll = np.empty((C, N, spec.n_bands))
        idx = _predictive_index(N, n_predictive)
        n_pred = len(idx)
        models = np.empty((C, n_pred) + image.shape) if n_pred else None
        s1, s2 = np.zeros((S,) + image.shape), np.zeros((S,) + image.shape)
        sig = model_psf_sigma_pix(self.prior.frame)
        step = self._draw_batch()
        for c in range(C):
            for i in range(0, N, step):
                j = np.arange(i, min(N, i + step))
                boxes, origins, st = self._source_boxes(
                    det["latent"][c][j], det["log_flux"][c][j], det["position"][c][j])
                model = np.zeros((len(j),) + image.shape)
                self._paste_sources(boxes, origins, s1, s2, model)
                ll[c, j] = loglike_per_band(model, image, sigma, good, np)
                if need_e:
                    g1, g2 = psf_corrected_shape_fast(st.reshape((-1,) + st.shape[2:]), sig)
                    e1[c, j], e2[c, j] = g1.reshape(len(j), S), g2.reshape(len(j), S)
                if n_pred:
                    k = np.flatnonzero((idx >= i) & (idx < i + step))
                    models[c, k] = model[idx[k] - i]
        var = self._variables(draws, det, (e1, e2) if need_e else None)
        ppc = _replicate(models, sigma, seed) if n_pred else None
        mean = s1 / (C * N)
        std = np.sqrt(np.clip(s2 / (C * N) - mean**2, 0.0, None))
        return var, ll, ppc, idx, mean.astype(np.float32), std.astype(np.float32)

    def source_images(self, draws: Draws, max_draws: int = 64, batch: int = 16):
        """Deblended image of every source: posterior mean and pixel std over (up to
        ``max_draws`` evenly spaced) draws of its PSF-convolved model in the scene frame,
        each ``(source, band, y, x)`` in image units. Draws with ``templates`` (photometry)
        use every draw: their images are ``flux * template`` of the draw's morphology."""
        if draws.templates is not None:
            t = draws.templates
            f = draws.extra["flux"].reshape((-1,) + draws.extra["flux"].shape[2:])  # (n, S, B)
            k = draws.extra["morph"].reshape(-1)
            s1 = np.zeros(t.shape[1:])
            s2 = np.zeros(t.shape[1:])
            for m in np.unique(k):
                fm = f[k == m]
                s1 += fm.sum(0)[..., None, None] * t[m]
                s2 += (fm**2).sum(0)[..., None, None] * t[m] ** 2
            n = len(f)
        else:
            det = self.problem.deterministic(draws.flat)
            z, lf, pos = (det[k].reshape((-1,) + det[k].shape[2:])
                          for k in ("latent", "log_flux", "position"))
            idx = np.linspace(0, len(z) - 1, min(max_draws, len(z))).astype(int)
            S = self.n_sources
            s1 = np.zeros((S, self.spec.n_bands) + tuple(self.scene.shape))
            s2 = np.zeros_like(s1)
            for i in range(0, len(idx), batch):
                j = idx[i:i + batch]
                boxes, origins, _ = self._source_boxes(z[j], lf[j], pos[j])
                self._paste_sources(boxes, origins, s1, s2)
            n = len(idx)
        mean = s1 / n
        std = np.sqrt(np.clip(s2 / n - mean**2, 0.0, None))
        return mean.astype(np.float32), std.astype(np.float32)

    def _linear_models(self, draws: Draws, c: int, idx) -> np.ndarray:
        """Noiseless scenes (n, band, y, x) of draws ``idx`` of chain ``c`` from their
        morphology templates and fluxes (draws with ``templates`` only)."""
        f = draws.extra["flux"][c][idx]  # (n, S, B)
        k = draws.extra["morph"][c][idx]
        out = np.empty((len(idx),) + draws.templates.shape[2:])
        for m in np.unique(k):
            sel = k == m
            out[sel] = np.einsum("nsb,sbyx->nbyx", f[sel], draws.templates[m])
        return out

    def predictive(self, draws: Draws, n_predictive: int | None = None, seed: int = 0,
                   batch: int = 64):
        """Per-band log-likelihood of every draw (chain, draw, band) and noisy replicated images
        (chain, n_pred, band, y, x) of ``n_predictive`` evenly spaced draws (default all).
        Draws with ``templates`` (photometry) are linear in their fluxes: no render."""
        from .likelihood import loglike_per_band

        spec, prob = self.spec, self.problem
        linear = draws.templates is not None
        det = None if linear else prob.deterministic(draws.flat)
        C, N = (draws.extra["flux"] if linear else det["log_flux"]).shape[:2]
        sigma, image = (np.asarray(a, np.float64) for a in (spec.sigma, spec.image))
        good = np.asarray(spec.good, bool)

        def batched(name, idx, c):
            out = []
            for i in range(0, len(idx), batch):
                j = idx[i:i + batch]
                if linear:
                    m = self._linear_models(draws, c, j)
                    out.append(m if name == "model_image"
                               else loglike_per_band(m, image, sigma, good, np))
                    continue
                out.append(np.asarray(prob.fn(name)(
                    det["latent"][c][j].astype(np.float32),
                    det["log_flux"][c][j].astype(np.float32),
                    det["position"][c][j].astype(np.float32), spec)))
            return np.concatenate(out)

        all_idx = np.arange(N)
        ll = np.stack([batched("loglike_bands", all_idx, c) for c in range(C)])
        idx = _predictive_index(N, n_predictive)
        ppc = None
        if len(idx):
            models = np.stack([batched("model_image", idx, c) for c in range(C)])
            ppc = _replicate(models, sigma, seed)
        return ll.astype(np.float64), ppc, idx

    def to_inference_data(self, draws: Draws, *, n_predictive: int | None = 100,
                          source_image_draws: int = 64, seed: int = 0, attrs: dict | None = None):
        """ArviZ InferenceData of draws (:func:`probdeblend.results.build_inference_data`):
        posterior, sample_stats, log_likelihood (per band, every draw), posterior_predictive
        (``n_predictive`` draws, ``None`` = all), constant_data, deblended source images.

        The source images average every draw: photometric draws are linear in their
        templates, and rendered draws (laplace, NUTS, SVI) are decoded once each for all the
        products (:meth:`_rendered_products`), so ``source_image_draws`` (kept for
        compatibility) no longer limits them."""
        from .results import build_inference_data

        t0 = time.perf_counter()
        if draws.templates is None:  # rendered draws: one decode per draw for everything
            var, ll, ppc, idx, mean, std = self._rendered_products(draws, n_predictive, seed)
        else:
            var = self.measure(draws)
            ll, ppc, idx = self.predictive(draws, n_predictive, seed)
            mean, std = self.source_images(draws, source_image_draws)
        failed = np.mean(~np.isfinite(var["e1"]) | ~np.isfinite(var["e2"]), axis=(0, 1))
        stats = dict(draws.sample_stats)
        C, N = var["flux"].shape[:2]
        if "lp" not in stats:
            # log prior of the sites + the pixel term of each draw's log-likelihood (computed
            # above for every draw: rendered, or the linear model of photometric draws); what
            # logp_batch gives where flux = exp(log_flux); lp has no likelihood normalisation
            from .likelihood import log_normalisation

            norm = log_normalisation(np.asarray(self.spec.sigma, np.float64),
                                     np.asarray(self.spec.good, bool), np)
            stats["lp"] = (self.problem.log_prior_batch(draws.flat.reshape(C * N, -1))
                           .reshape(C, N) + (ll - norm).sum(-1))
        timings = {**self.timings, **draws.timings, "measure_s": time.perf_counter() - t0}
        info = {k: v for k, v in draws.info.items()
                if isinstance(v, (int, float, str, bool, np.integer, np.floating))}
        if "pareto_k" in draws.info:
            info["pareto_k"] = np.atleast_1d(draws.info["pareto_k"]).tolist()
        if "flux_model" in draws.info:  # the laplace flux model-error term, as JSON
            info["flux_model"] = json.dumps(draws.info["flux_model"])
        all_attrs = {"prior": self.prior.name, "n_sources": self.n_sources,
                     "detected": int(self.detections is not None),
                     "e_failed_fraction": failed.tolist(), **info,
                     **{f"time_{k}": round(float(v), 3) for k, v in timings.items()},
                     **(attrs or {})}
        return build_inference_data(
            {k: var[k] for k in ("flux", "e1", "e2", "x_pix", "y_pix", "latent", "log_flux")},
            self.scene, method=draws.method, library=draws.library, sample_stats=stats,
            log_likelihood=ll, posterior_predictive=ppc,
            predictive_draws=idx if ppc is not None else None,
            source_images_mean=mean, source_images_std=std, positions_given=self.positions0,
            attrs=all_attrs)


def _predictive_index(n_draw: int, n_predictive: int | None) -> np.ndarray:
    """Indices of the ``n_predictive`` evenly spaced draws (``None``: all) that get a
    replicated image."""
    n = n_draw if n_predictive is None else max(0, min(int(n_predictive), n_draw))
    return np.linspace(0, n_draw - 1, n).astype(int) if n else np.zeros(0, int)


def _replicate(models, sigma, seed: int) -> np.ndarray:
    """Noisy replicated images (float32) of noiseless ``models``: Gaussian pixel noise of
    ``sigma``, seeded."""
    rng = np.random.default_rng(seed)
    return (models + sigma * rng.standard_normal(models.shape)).astype(np.float32)


def _template_fn(twin, image_shape):
    """Compiled ``(z (n, D), positions (n, 2), kernel_ft, freq_y, freq_x) -> (n, band, y, x)``:
    unit-flux images of single sources in a scene of ``image_shape``, one per prior twin and
    image shape (the PSF kernels are arguments, so every scene of that shape shares it)."""
    cache = twin.__dict__.setdefault("_template_fns", {})
    key = tuple(image_shape)
    if key not in cache:
        import jax
        import jax.numpy as jnp

        from .render import render

        def fn(z, pos, kernel_ft, fy, fx):
            stamps = twin.decode(z[:, None])  # (n, 1, band, h, w), each band sums to 1
            ones = jnp.ones(stamps.shape[:3], stamps.dtype)
            return render(stamps, ones, pos[:, None], kernel_ft, (fy, fx), key, jnp)

        cache[key] = jax.jit(fn)
    return cache[key]


def _fallback_q(scene, prior, positions):
    """Crude starting point when no amortized encoder exists for the prior: z = 0, sep Kron
    fluxes, the given positions, broad scales."""
    from .amortized.q import AmortizedQ
    from .detection import sep_baseline

    S, B, D = len(positions), scene.n_bands, prior.latent_dim
    flux = np.full((S, B), 1.0)
    tab = sep_baseline(scene)
    if len(tab):
        for s, (x, y) in enumerate(positions):
            j = int(np.argmin((tab["x"] - x) ** 2 + (tab["y"] - y) ** 2))
            flux[s] = [max(float(tab[f"flux_{b}"][j]), 1.0) for b in scene.bands]
    loc = np.concatenate([np.zeros((S, D)), np.log(flux), np.zeros((S, 2))], -1)
    scale = np.concatenate([np.ones((S, D)), np.full((S, B), 0.5), np.full((S, 2), 0.5)], -1)
    return AmortizedQ(loc, scale, np.zeros((S, loc.shape[1], 0)),
                      {"z": D, "log_flux": B, "offset": 2}, np.asarray(positions, np.float64))
