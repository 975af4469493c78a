"""The probabilistic scene model, written once for Pyro (torch) and NumPyro (JAX).

For a scene with ``S`` sources, ``B`` bands and a prior with latent dimension ``D``::

    u_s       ~ Normal(0, I_D)                         "latent_base"  (S, D)
    z_s       = flow(u_s)                              "latent"       (S, D)  deterministic
    log f_sb  ~ Normal(flux_loc_sb, flux_scale_sb)     "log_flux"     (S, B)
    d_s       ~ Normal(0, position_scale)              "offset"       (S, 2)  pixels
    scene_b   = render(decode(z), exp(log f), x0 + d)                          (B, ny, nx)
    image     ~ Normal(scene, sqrt(variance))  over unmasked pixels            "obs"

When conditioning on the image, ``obs`` is a ``factor`` holding ``-0.5 * sum(residual^2 /
variance)``: the Gaussian log-likelihood without its normalising constant (a constant of the
data, ~1e5 nats for an 80x80x6 scene, which would otherwise eat float32's resolution of the
log-density); see :mod:`probdeblend.likelihood`. The ``log_likelihood`` group of results is
normalised.

``z = flow(u)`` with ``u ~ N(0, I)`` is *exactly* the learned prior of the latent (the flow is
the prior's own density, see :mod:`probdeblend.priors`); sampling in ``u`` whitens the prior,
which is what MCMC wants. Fluxes are sampled in log space (positivity, scale-free geometry).
Positions are offsets from the detected / given positions ``x0``.

Flux prior: by default a broad log-normal (``flux_scale = 2``, a factor ~7) centred on an
initial flux estimate; at the SNRs deblending is used for (> 10) the likelihood dominates it.
Position prior: ``Normal(x0, 1 pixel)`` per axis by default.

The same function body :func:`scene_model` runs under both PPLs: a :class:`Backend` bundles the
PPL module (``pyro`` / ``numpyro``), its distributions, the array namespace (``torch`` /
``jax.numpy``) and the prior's decode / flow functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .likelihood import chi2_loglike
from .render import SceneRenderer, render

__all__ = ["Backend", "SceneSpec", "scene_model", "magnitude_context"]

#: ``2.5 / ln(10)``: magnitudes per e-fold of flux
MAG_PER_LN = 2.5 / float(np.log(10.0))

#: AB magnitude of 1 nJy: ``mag = 31.4 - 2.5 log10(flux / nJy)``
_NJY_MAG_ZERO = 31.4


def magnitude_context(prior, scene) -> tuple[int, float] | None:
    """``(band index in scene, m0)`` for a magnitude-conditioned ``prior`` (a latent flow
    with a :class:`~probdeblend.priors.flow.MagnitudeConditional` map), such that a source's
    AB magnitude is ``m0 - 2.5 log10(flux)`` of that band; None for an unconditional prior.

    ``m0``: 31.4 for a scene in ``nJy``; for ``electron`` (the simulator's unit: electrons over
    the full survey exposure), ``zeropoint + 2.5 log10(exposure_time)`` of the band in the
    prior's survey (:attr:`probdeblend.survey.Band.magnitude_zero`). Scenes in other units
    get the unconditional prior, with a warning.
    """
    import warnings

    band = getattr(prior, "magnitude_band", None)
    if band is None or band not in scene.bands:
        return None
    units = str(getattr(scene, "units", "electron"))
    if units == "nJy":
        m0 = _NJY_MAG_ZERO
    elif units == "electron":
        from .survey import get_survey

        m0 = get_survey(prior.frame.survey).band(band).magnitude_zero
    else:
        warnings.warn(f"the prior {prior.name!r} conditions galaxy morphologies on the "
                      f"{band}-band AB magnitude, which needs fluxes in 'electron' or 'nJy'; "
                      f"this scene is in {units!r}, so the unconditional prior is used",
                      stacklevel=3)
        return None
    return list(scene.bands).index(band), float(m0)


@dataclass
class Backend:
    """PPL + array namespace + prior functions for :func:`scene_model`.

    Build it with :meth:`pyro` or :meth:`numpyro`.
    """

    name: str
    ppl: Any
    dist: Any
    xp: Any
    decode: Any      # z (..., S, D) -> flux-normalised stamps (..., S, B, n, n)
    from_base: Any   # (u (..., S, D), AB magnitude (..., S) or None) -> z
    asarray: Any
    torch_prior: Any = None  # the torch LearnedPrior behind either backend, when known

    @classmethod
    def pyro(cls, prior) -> Backend:
        """Backend for a torch :class:`~probdeblend.priors.distribution.LearnedPrior`."""
        import pyro
        import pyro.distributions as dist
        import torch

        def from_base(u, mag=None):
            return u if prior.flow is None else prior.flow(u, mag)[0]

        def asarray(a):
            a = np.asarray(a)
            return torch.as_tensor(_single(a))

        return cls("pyro", pyro, dist, torch, prior.decode, from_base, asarray, prior)

    @classmethod
    def numpyro(cls, prior) -> Backend:
        """Backend for a :class:`~probdeblend.priors.jax_twin.LearnedPriorNumPyro` (or torch
        prior, converted with ``to_numpyro()``)."""
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        torch_prior = None
        if not hasattr(prior, "twin"):
            torch_prior, prior = prior, prior.to_numpyro()
        twin = prior.twin

        _register_pytree()

        def asarray(a):
            return jnp.asarray(_single(np.asarray(a)))

        return cls("numpyro", numpyro, dist, jnp, twin.decode,
                   lambda u, mag=None: twin.flow_forward(u, mag)[0], asarray, torch_prior)


def _single(a: np.ndarray) -> np.ndarray:
    """float64 -> float32, complex128 -> complex64; other dtypes unchanged."""
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    if a.dtype.kind == "c":
        return a.astype(np.complex64)
    return a


@dataclass
class SceneSpec:
    """Everything about one scene that the model needs, as backend arrays.

    Build with :meth:`build`. Array fields are data (for NumPyro the spec is a JAX pytree, so
    one compiled log-density serves every scene of the same shapes); ``position_scale``,
    ``latent_dim`` and ``image_shape`` are static.
    """

    image: Any
    sigma: Any
    good: Any
    positions0: Any
    flux_loc: Any
    flux_scale: Any
    kernel_ft: Any
    freq_y: Any
    freq_x: Any
    position_scale: float
    latent_dim: int
    image_shape: tuple[int, int]
    model_psf_sigma: float = 0.0
    mag_zero: Any = 0.0
    mag_band: int = -1

    _ARRAYS = ("image", "sigma", "good", "positions0", "flux_loc", "flux_scale", "kernel_ft",
               "freq_y", "freq_x", "mag_zero")

    def magnitude(self, log_flux, xp):
        """AB magnitudes ``(...)`` of band :attr:`mag_band` from log fluxes ``(..., band)``
        (``mag = mag_zero - 2.5 log10(flux)``), the context of a magnitude-conditioned
        prior; None when the prior is unconditional (``mag_band < 0``)."""
        if self.mag_band < 0:
            return None
        return self.mag_zero - MAG_PER_LN * log_flux[..., self.mag_band]

    @property
    def n_sources(self) -> int:
        return int(self.positions0.shape[0])

    @property
    def n_bands(self) -> int:
        return int(self.image.shape[0])

    def shape_key(self) -> tuple:
        """Shapes that determine a compiled log-density (sources, latent, bands, image, FFT,
        and which band conditions the prior)."""
        return (self.n_sources, self.latent_dim, self.n_bands, tuple(self.image_shape),
                tuple(self.kernel_ft.shape), float(self.position_scale), int(self.mag_band))

    def render(self, stamps, fluxes, positions, xp, shear=None):
        """Noiseless scene (…, band, y, x) of flux-normalised stamps (see :func:`render`);
        ``shear`` (g1, g2) shears every PSF-free galaxy."""
        return render(stamps, fluxes, positions, self.kernel_ft, (self.freq_y, self.freq_x),
                      self.image_shape, xp, shear=shear, model_psf_sigma=self.model_psf_sigma)

    def with_arrays(self, convert) -> SceneSpec:
        """A copy with every array field passed through ``convert``."""
        kw = {k: getattr(self, k) for k in self.__dataclass_fields__}
        kw.update({k: convert(kw[k]) for k in self._ARRAYS})
        return SceneSpec(**kw)

    @classmethod
    def build(cls, backend: Backend, scene, renderer: SceneRenderer, positions0,
              flux_init, latent_dim: int, flux_scale: float = 2.0,
              position_scale: float = 1.0, model_error: float = 0.0,
              magnitude: tuple[int, float] | None = None) -> SceneSpec:
        """Assemble a spec from a :class:`~probdeblend.Scene`.

        Parameters
        ----------
        renderer : SceneRenderer
            Precomputed difference kernels of the scene's PSFs and the prior's frame.
        positions0 : array (S, 2)
            Centres of the position priors (pixels, Scene convention).
        flux_init : array (S, B)
            Positive flux estimates (image units): centres of the log-flux priors.
        flux_scale : float
            Width of the log-flux prior (natural log).
        position_scale : float
            Width of the position prior (pixels).
        model_error : float
            Fractional model error added in quadrature to the pixel noise,
            ``sigma^2 = variance + (model_error * max(image, 0))^2`` (the observed image stands
            in for the model, so the likelihood stays Gaussian with fixed variance). It widens
            the posterior of bright sources, where a percent-level mismatch between the prior's
            galaxies (or the PSF image) and the data dominates the photon noise; 0 disables it.
        magnitude : (int, float), optional
            ``(band index, m0)`` for a magnitude-conditioned prior: the prior of each source's
            latent is conditioned on ``m0 - 2.5 log10(flux[band])`` (see
            :func:`magnitude_context`); None: unconditional.
        """
        weight = np.asarray(scene.weight, dtype=np.float64)
        good = weight > 0
        sigma = np.where(good, 1.0 / np.sqrt(np.where(good, weight, 1.0)), 1.0)
        if model_error:
            img = np.clip(np.asarray(scene.image, dtype=np.float64), 0.0, None)
            sigma = np.sqrt(sigma**2 + (float(model_error) * img) ** 2)
        flux_init = np.clip(np.asarray(flux_init, dtype=np.float64), 1e-3, None)
        spec = cls(
            image=scene.image, sigma=sigma, good=good,
            positions0=np.asarray(positions0, dtype=np.float64),
            flux_loc=np.log(flux_init), flux_scale=np.full(flux_init.shape, flux_scale),
            kernel_ft=renderer.kernel_ft.astype(np.complex64), freq_y=renderer.freqs[0],
            freq_x=renderer.freqs[1], position_scale=float(position_scale),
            latent_dim=int(latent_dim), image_shape=tuple(renderer.image_shape),
            mag_zero=np.asarray(0.0 if magnitude is None else magnitude[1], np.float64),
            mag_band=-1 if magnitude is None else int(magnitude[0]),
        )
        return spec.with_arrays(backend.asarray)


def _register_pytree():
    """Register :class:`SceneSpec` as a JAX pytree (array fields = leaves)."""
    import jax

    if getattr(_register_pytree, "done", False):
        return
    static = ("position_scale", "latent_dim", "image_shape", "model_psf_sigma", "mag_band")

    def flatten(spec):
        return ([getattr(spec, k) for k in SceneSpec._ARRAYS],
                tuple(getattr(spec, k) for k in static))

    def unflatten(aux, leaves):
        return SceneSpec(**dict(zip(SceneSpec._ARRAYS, leaves, strict=True)),
                         **dict(zip(static, aux, strict=True)))

    jax.tree_util.register_pytree_node(SceneSpec, flatten, unflatten)
    _register_pytree.done = True


def scene_model(backend: Backend, spec: SceneSpec, observe: bool = True, shear=None):
    """The scene model (see the module docstring). Runs under Pyro or NumPyro.

    Parameters
    ----------
    backend : Backend
    spec : SceneSpec
    observe : bool
        Condition on ``spec.image`` (False: sample the image, for prior predictive checks).
    shear : array (2,), optional
        A constant reduced shear (g1, g2) applied to every galaxy of the scene (the latents then
        describe the *intrinsic*, unlensed galaxies). Used by the full-forward-model shear
        inference, :func:`probdeblend.shear.infer_forward`, where it is a shared sample site.

    Returns
    -------
    The noiseless model scene (band, y, x).
    """
    ppl, dist, xp = backend.ppl, backend.dist, backend.xp
    S, D = spec.n_sources, spec.latent_dim
    u = ppl.sample("latent_base", dist.Normal(xp.zeros((S, D)), 1.0).to_event(2))
    log_flux = ppl.sample("log_flux", dist.Normal(spec.flux_loc, spec.flux_scale).to_event(2))
    z = ppl.deterministic("latent", backend.from_base(u, spec.magnitude(log_flux, xp)))
    offset = ppl.sample("offset",
                        dist.Normal(xp.zeros((S, 2)), spec.position_scale).to_event(2))
    positions = ppl.deterministic("position", spec.positions0 + offset)
    model = spec.render(backend.decode(z), xp.exp(log_flux), positions, xp, shear=shear)
    if observe:
        ppl.factor("obs", chi2_loglike(model, spec.image, spec.sigma, spec.good, xp))
    else:
        ppl.sample("obs", dist.Normal(model, spec.sigma).mask(spec.good).to_event(3))
    return model
