"""A learned galaxy prior as a Pyro distribution over the latent vector.

:class:`LearnedPrior` is what :func:`probdeblend.load_prior` returns. It is a
:class:`pyro.distributions.TorchDistribution` over ``z in R^D`` (``event_shape = (D,)``) whose
``log_prob`` is the **true** log-density of the latent prior (the latent flow's exact change of
variables, or the standard normal when the prior has no flow), so Pyro's SVI, NUTS and importance
sampling see an exact prior. ``decode(z)`` maps latents to galaxy images in the prior's
:class:`~probdeblend.priors.frame.ModelFrame`:

.. code-block:: python

    prior = probdeblend.load_prior("lsst-vae")
    def model(obs):
        z = pyro.sample("z", prior)                                  # (D,)
        n_bands = prior.frame.n_bands
        flux = pyro.sample("flux", dist.LogNormal(8.0, 2.0).expand([n_bands]).to_event(1))
        image = prior.decode(z, flux)                                # (band, y, x)
        pyro.sample("obs", dist.Normal(image, 1.0).to_event(3), obs=obs)

The networks are frozen (``requires_grad=False``, eval mode, channels-last memory format) in
place; gradients flow with respect to ``z`` (and anything ``z`` depends on).

Caches: :meth:`LearnedPrior.to_numpyro` builds the JAX twin once per prior and keeps it in
:attr:`LearnedPrior.cache` (shared by :meth:`~LearnedPrior.expand`-ed copies), together with
whatever compiled functions an engine stores there under its own key;
:meth:`LearnedPrior.clear_cache` empties it (e.g. to free the jitted functions' memory).

Speed on CPU: the faint outskirts of decoded galaxies underflow to denormal floats, whose
arithmetic made torch decoder gradients ~20x slower. Loading a prior does **not** change the
process-wide flush-to-zero setting; wrap long torch inference or training loops in
:func:`probdeblend.training.flush_denormals` (a context manager that restores the setting).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pyro.distributions as pdist
import torch
from torch.distributions import constraints

from ..errors import NO_VALUE, ArgumentError, ArgumentTypeError, PriorLoadError
from .flow import LatentFlow
from .frame import ModelFrame
from .nets import Decoder, Encoder

__all__ = ["LearnedPrior"]

_LOG_2PI = math.log(2.0 * math.pi)


def _freeze(module: torch.nn.Module | None) -> None:
    if module is None:
        return
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


class LearnedPrior(pdist.TorchDistribution):
    """Learned prior over a galaxy's latent morphology vector ``z``.

    Parameters
    ----------
    encoder : Encoder
        ``q(z | x)`` network (used by :meth:`encode`).
    decoder : Decoder
        ``z`` -> flux-normalised image network (used by :meth:`decode`).
    flow : LatentFlow or None
        Latent flow giving the prior density; ``None`` means ``z ~ N(0, I)``.
    frame : ModelFrame
        Model frame of the decoder (all bands the networks were trained on).
    card : dict, optional
        Model card (see :mod:`probdeblend.priors.io`).
    bands : sequence of str, optional
        Decode only these bands, in this order (a subset of ``frame.bands``).
    batch_shape : tuple, optional
        Batch shape (independent copies), as after :meth:`expand`.
    validate_args : bool, optional
        Also check that values are finite in :meth:`log_prob`.

    Attributes
    ----------
    frame : ModelFrame
        Frame of the decoded images (restricted to the selected bands).
    card : dict
        Model card.
    cache : dict
        Objects built for this prior and reused by later calls: its JAX twin
        (:meth:`to_numpyro`) and engines' compiled functions. Cleared by :meth:`clear_cache`.
    bands : tuple of str
        Bands of decoded images (``frame.bands``).
    latent_dim : int
        ``D``.
    name : str
        Prior name from the card.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        flow: LatentFlow | None,
        frame: ModelFrame,
        card: dict | None = None,
        bands=None,
        batch_shape=(),
        validate_args=None,
    ):
        if decoder.n_bands != frame.n_bands:
            raise PriorLoadError(
                f"decoder has {decoder.n_bands} bands but the frame has {frame.n_bands} "
                f"({list(frame.bands)})"
            )
        self.full_frame = frame
        if bands is not None:
            frame = frame.select(bands)  # raises UnknownBandError
            idx = [self.full_frame.bands.index(b) for b in frame.bands]
            if idx != list(range(self.full_frame.n_bands)):
                decoder = _slice_decoder(decoder, idx)
        self.frame = frame
        self.encoder, self.decoder, self.flow = encoder, decoder, flow
        for m in (encoder, decoder, flow):
            _freeze(m)
        for m in (encoder, decoder):
            m.to(memory_format=torch.channels_last)  # ~4x faster convolutions on CPU
        self.cache: dict = {}
        self.magnitude: torch.Tensor | None = None  # see given_magnitude
        self.card = dict(card or {})
        self.latent_dim = int(decoder.latent_dim)
        if flow is not None and flow.dim != self.latent_dim:
            raise PriorLoadError(
                f"flow dimension {flow.dim} != decoder latent_dim {self.latent_dim}"
            )
        super().__init__(
            torch.Size(batch_shape), torch.Size((self.latent_dim,)), validate_args=validate_args
        )

    # -- descriptive attributes ------------------------------------------------------------
    @property
    def bands(self) -> tuple[str, ...]:
        return self.frame.bands

    @property
    def name(self) -> str:
        return str(self.card.get("name", "unnamed-prior"))

    @property
    def kind(self) -> str:
        return str(self.card.get("kind", "vae"))

    @property
    def latent_prior(self) -> str:
        """``"flow"`` or ``"normal"``: what :meth:`log_prob` and :meth:`rsample` use."""
        return "flow" if self.flow is not None else "normal"

    def __repr__(self) -> str:
        return (
            f"LearnedPrior(name={self.name!r}, kind={self.kind!r}, bands={list(self.bands)}, "
            f"latent_dim={self.latent_dim}, latent_prior={self.latent_prior!r}, "
            f"batch_shape={tuple(self.batch_shape)})"
        )

    @property
    def magnitude_band(self) -> str | None:
        """The band whose AB magnitude conditions the latent prior (a flow with a
        :class:`~.flow.MagnitudeConditional` map), or None for an unconditional prior."""
        ctx = None if self.flow is None else self.flow.context
        return None if ctx is None else ctx.band

    def given_magnitude(self, mag) -> LearnedPrior:
        """This prior conditioned on the AB magnitude(s) ``mag`` of :attr:`magnitude_band`
        (broadcast against the batch shape): ``p(z | m)``, the size-magnitude relation of the
        training galaxies (fainter galaxies are smaller). For an unconditional prior the
        result is the same prior. ``mag`` may depend on other sample sites (e.g. a flux)::

            f_r = pyro.sample("flux_r", ...)
            z = pyro.sample("z", prior.given_magnitude(zeropoint - 2.5 * torch.log10(f_r)))
        """
        new = self.expand(self.batch_shape)
        new.magnitude = None if self.magnitude_band is None else torch.as_tensor(mag)
        return new

    # -- distribution API -------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LearnedPrior, _instance)
        keys = ("full_frame", "frame", "encoder", "decoder", "flow", "card", "latent_dim", "cache",
                "magnitude")
        for key in keys:
            setattr(new, key, getattr(self, key))
        super(LearnedPrior, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def _param_dtype(self) -> torch.dtype:
        return self.decoder.fc.weight.dtype

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """Reparameterised draw of shape ``sample_shape + batch_shape + (D,)``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self._param_dtype())
        if self.flow is None:
            return eps
        return self.flow(eps, self.magnitude)[0]

    def _check_value(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(
                "value", type(value).__name__,
                f"value must be a torch.Tensor, got {type(value).__name__}"
            )
        shape = tuple(value.shape)
        if shape[-1:] != tuple(self.event_shape):
            raise ArgumentError(
                "value", shape, f"Expected event shape {tuple(self.event_shape)}, but got {shape}"
            )
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ArgumentError("value", shape,
                f"Value batch shape {shape[:-1]} is not broadcastable with batch shape "
                f"{tuple(self.batch_shape)}"
            ) from None
        if self._validate_args and not bool(torch.isfinite(value).all()):
            raise ArgumentError(
                "value", NO_VALUE, "The value argument to log_prob must be finite (got NaN or inf)"
            )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density of ``value`` (``(..., D)`` -> ``(...)`` broadcast with batch_shape)."""
        self._check_value(value)
        dtype = value.dtype
        z = value.to(self._param_dtype())
        if self.flow is None:
            lp = -0.5 * (z**2).sum(-1) - 0.5 * self.latent_dim * _LOG_2PI
        else:
            lp = self.flow.log_prob(z, self.magnitude)
        lp = lp.to(dtype)
        shape = torch.broadcast_shapes(lp.shape, self.batch_shape)
        return lp.expand(shape) if lp.shape != shape else lp

    def entropy(self):
        if self.flow is None:
            return torch.full(self.batch_shape, 0.5 * self.latent_dim * (1.0 + _LOG_2PI))
        raise NotImplementedError(
            "the entropy of a flow prior has no closed form; estimate it "
            "as -log_prob(sample((n,))).mean()"
        )

    # -- networks ------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, flux: torch.Tensor | None = None) -> torch.Tensor:
        """Galaxy image(s) in the model frame.

        Parameters
        ----------
        z : Tensor ``(..., D)``
            Latent vector(s).
        flux : Tensor ``(..., band)``, optional
            Total flux per band. Without it the images are flux-normalised (each band sums
            to 1); with it, band ``b`` is multiplied by ``flux[..., b]``.

        Returns
        -------
        Tensor ``(..., band, y, x)``, non-negative, noiseless, convolved with the model PSF and
        centred on the stamp centre (see :class:`ModelFrame`).
        """
        if z.shape[-1:] != self.event_shape:
            raise ArgumentError("z", tuple(z.shape),
                f"Expected event shape {tuple(self.event_shape)}, but got {tuple(z.shape)}"
            )
        dtype = z.dtype
        img = self.decoder(z.to(self._param_dtype())).to(dtype)
        if flux is not None:
            if flux.shape[-1] != self.frame.n_bands:
                raise ArgumentError("flux", tuple(flux.shape),
                    f"flux must have one entry per band {list(self.bands)} in its last axis, "
                    f"got shape {tuple(flux.shape)}"
                )
            img = img * flux[..., :, None, None]
        return img

    def decode_numpy(self, z, batch_size: int = 64) -> np.ndarray:
        """Flux-normalised stamps ``(..., band, y, x)`` (float32 numpy) of latents
        ``z (..., D)`` (array-like), forward only, in batches of ``batch_size``.

        For products of many draws (shapes, templates, catalogues), which need no gradient.
        On CPU (2 cores, torch 2.13) batches of 64 decode at ~0.5 ms per 6x48x48 stamp and
        batches of 256 at ~0.8 ms (the larger batch's activations fall out of cache); the JAX
        twin, built for gradients inside compiled loops, takes ~1.6 ms."""
        z = np.array(z, dtype=np.float32)  # a writable copy for torch.from_numpy
        flat = z.reshape(-1, z.shape[-1])
        out = np.empty((len(flat),) + tuple(self.frame.shape), np.float32)
        with torch.inference_mode():
            for i in range(0, len(flat), int(batch_size)):
                out[i:i + int(batch_size)] = self.decode(
                    torch.from_numpy(flat[i:i + int(batch_size)])).numpy()
        return out.reshape(z.shape[:-1] + out.shape[1:])

    def encode(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x)`` of noiseless images ``(..., band, y, x)`` -> ``(loc, scale)``, ``(..., D)``.

        The images must hold all bands the prior was trained on (``full_frame.bands``), in the
        model frame, in any flux unit (they are normalised per band).
        """
        images = torch.as_tensor(
            np.asarray(images) if not isinstance(images, torch.Tensor) else images
        )
        expected = self.full_frame.shape
        if tuple(images.shape[-3:]) != expected:
            raise ArgumentError("images", tuple(images.shape),
                f"images must have shape (..., {expected[0]}, {expected[1]}, {expected[2]}) for "
                f"bands {list(self.full_frame.bands)}, got {tuple(images.shape)}"
            )
        loc, log_scale = self.encoder(images.to(self._param_dtype()))
        return loc, log_scale.exp()

    def to_numpyro(self, fast_grad: bool = False):
        """The JAX/NumPyro twin (:class:`~probdeblend.priors.jax_twin.LearnedPriorNumPyro`).

        Built from :meth:`export_weights` (identical output within float32 tolerance), with the
        same batch shape. ``fast_grad`` selects the custom input-gradient rule of the JAX decoder
        (see :mod:`probdeblend.priors.jax_twin`). The twin's weights and jitted functions are
        built once per prior and ``fast_grad`` and kept in :attr:`cache` (key
        ``("jax_prior", fast_grad)``), so later calls are free; :meth:`clear_cache` drops them.
        """
        from .jax_twin import JaxPrior, LearnedPriorNumPyro

        key = ("jax_prior", bool(fast_grad))
        twin = self.cache.get(key)
        if twin is None:
            s_max = self.flow.s_max if self.flow is not None else None
            ctx = None if self.flow is None or self.flow.context is None else \
                self.flow.context.config()
            twin = JaxPrior(
                self.export_weights(), frame=self.frame, card=self.card, s_max=s_max,
                fast_grad=fast_grad, context=ctx,
            )
            self.cache[key] = twin
        return LearnedPriorNumPyro(twin, batch_shape=tuple(self.batch_shape))

    def clear_cache(self) -> None:
        """Forget the JAX twin and everything engines compiled for this prior (:attr:`cache`).

        The next :meth:`to_numpyro` (or fit) rebuilds and recompiles them. Shared with the
        prior's :meth:`expand`-ed copies.
        """
        self.cache.clear()
        self.__dict__.pop("_probdeblend_numpyro", None)  # written by older fit.py versions

    def export_weights(self) -> dict[str, np.ndarray]:
        """All weights as numpy arrays under stable semantic names (the JAX twin's input).

        The union of :meth:`Encoder.export_weights`, :meth:`Decoder.export_weights` (of the
        band-selected decoder) and, with a flow, :meth:`LatentFlow.export_weights`: keys
        ``encoder.*``, ``decoder.*``, ``flow.*``, independent of the modules' layer layout.
        """
        out = {**self.encoder.export_weights("encoder"), **self.decoder.export_weights("decoder")}
        if self.flow is not None:
            out.update(self.flow.export_weights("flow"))
        return out


def _slice_decoder(decoder: Decoder, idx: list[int]) -> Decoder:
    """A copy of ``decoder`` whose output layer produces only bands ``idx``."""
    new = copy.deepcopy(decoder)
    old = decoder.out
    out = torch.nn.Conv2d(old.in_channels, len(idx), 3, padding=1)
    with torch.no_grad():
        out.weight.copy_(old.weight[idx])
        out.bias.copy_(old.bias[idx])
    new.out = out
    new.n_bands = len(idx)
    return new
