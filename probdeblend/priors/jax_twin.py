"""JAX / NumPyro twin of a learned prior, built from the same weights as the torch networks.

:class:`JaxPrior` holds the weights, by the semantic names the torch modules export
(:meth:`LearnedPrior.export_weights`: ``decoder.block{k}.conv1.weight``, ``flow.coupling{k}.perm``,
... documented in :meth:`~.nets.Decoder.export_weights`, :meth:`~.nets.Encoder.export_weights`
and :meth:`~.flow.LatentFlow.export_weights`), never by the modules' internal layer indices, and
exposes pure, jit-able functions: :meth:`JaxPrior.decode`,
:meth:`JaxPrior.encode`, :meth:`JaxPrior.flow_forward`, :meth:`JaxPrior.flow_inverse`,
:meth:`JaxPrior.log_prob`. :class:`LearnedPriorNumPyro` wraps it as a
:class:`numpyro.distributions.Distribution` with the same contract as the torch
:class:`~probdeblend.priors.distribution.LearnedPrior`.

Layout: convolutions run in NHWC with HWIO kernels (torch ``Conv2d`` weights ``(O, I, kh, kw)``
are transposed to ``(kh, kw, I, O)``); JAX on CPU is much faster in this layout. Nearest
upsampling is ``jnp.repeat``. The dense layers adjacent to the flatten / reshape steps have their
rows / columns permuted once at construction so that no NCHW transposes are needed. Outputs are
returned in the torch layout ``(..., band, y, x)``.

The weights are closed-over constants: gradients flow with respect to the inputs (``z``,
images), which is what inference needs. ``fast_grad=True`` gives the decoder's convolutions a
custom vector-Jacobian product (the input gradient of a stride-1 3x3 "SAME" convolution is a
convolution with the flipped, transposed kernel). Older JAX releases were several times slower
with their generic transpose rule on CPU; with JAX 0.10 on 2 CPU cores both take ~4 ms for
value-and-gradient of a 2-galaxy 6x48x48 potential, so the default is ``False``, which keeps
forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) available.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
from jax import lax
from numpyro.distributions import constraints

from ..errors import ArgumentError, PriorLoadError
from .flow import magnitude_features
from .frame import ModelFrame

__all__ = ["JaxPrior", "LearnedPriorNumPyro"]

_DN = ("NHWC", "HWIO", "NHWC")
_LOG_2PI = math.log(2.0 * math.pi)

#: latents per decoder block on CPU (see :meth:`JaxPrior._decode_flat`)
CPU_DECODE_BLOCK = 4


def _hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _conv(x, w, b, stride: int):
    if stride == 1 and w.shape[:2] == (3, 3):
        return _conv3x3_matmul(x, w) + b
    y = lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN)
    return y + b


def _conv3x3_matmul(x, w):
    """Stride-1 3x3 SAME convolution as one matmul over the nine shifted copies (im2col).

    XLA on CPU runs ``conv_general_dilated`` about 5x slower inside a loop (``while``/``scan``,
    i.e. inside NUTS's tree building) than when called on its own, while a matmul runs at full
    speed in both; measured with JAX 0.10 on 2 cores, value-and-gradient of the decoder for two
    latents: 25.5 ms (conv) vs 5.8 ms (matmul) per step inside ``lax.fori_loop``.
    """
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(9 * c, w.shape[-1])


def _make_fast_conv(w_hwio: np.ndarray, b: np.ndarray):
    """Stride-1 3x3 SAME conv with constant weights and a conv-based input VJP."""
    w = jnp.asarray(w_hwio)
    wt = jnp.asarray(np.ascontiguousarray(w_hwio[::-1, ::-1].transpose(0, 1, 3, 2)))
    bias = jnp.asarray(b)

    @jax.custom_vjp
    def conv(x):
        return _conv(x, w, bias, 1)

    def fwd(x):
        return conv(x), None

    def bwd(_, g):
        return (lax.conv_general_dilated(g, wt, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN),)

    conv.defvjp(fwd, bwd)
    return conv


def _make_conv(w_hwio: np.ndarray, b: np.ndarray, stride: int = 1):
    w, bias = jnp.asarray(w_hwio), jnp.asarray(b)
    return lambda x: _conv(x, w, bias, stride)


def _indices(weights: Mapping, pattern: str) -> list[int]:
    """``[0, 1, ..., n-1]`` for the ``n`` consecutive keys ``pattern.format(k)`` in ``weights``."""
    k = 0
    while pattern.format(k) in weights:
        k += 1
    return list(range(k))


class JaxPrior:
    """Pure-JAX decoder, encoder and latent flow built from a prior's weight dictionary.

    Parameters
    ----------
    weights : mapping of str to array
        ``encoder.*``, ``decoder.*`` and optionally ``flow.*`` arrays under the semantic names
        of :meth:`LearnedPrior.export_weights` (see the module docstring).
    frame : ModelFrame
        Model frame of the decoder output (its bands must match the decoder's output channels).
    card : dict, optional
        Model card; ``card["architecture"]["flow"]["s_max"]`` sets the coupling log-scale bound.
    s_max : float, optional
        Overrides the coupling log-scale bound (default 2.0 when not in the card).
    fast_grad : bool
        Use the custom input VJP for the decoder convolutions (see module docstring).
    context : dict, optional
        Configuration of the flow's magnitude-conditioned map (:meth:`~.flow.
        MagnitudeConditional.config`) when the weights hold ``flow.context.*``; default the
        card's ``architecture.flow.context``.
    """

    def __init__(
        self,
        weights: Mapping[str, np.ndarray],
        frame: ModelFrame,
        card: dict | None = None,
        s_max: float | None = None,
        fast_grad: bool = False,
        context: dict | None = None,
    ):
        w = {}
        for k, v in weights.items():
            v = np.asarray(v)
            w[k] = v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        self.frame = frame
        self.card = dict(card or {})
        self.fast_grad = bool(fast_grad)
        self._build_decoder(w)
        self._build_encoder(w)
        self._build_flow(w, s_max, context)
        # jitted cores on flattened batches (inlined when called inside an outer jit)
        self._decode_jit = jax.jit(self._decode_flat)
        self._encode_jit = jax.jit(self._encode_flat) if self.has_encoder else None
        self._forward_jit = jax.jit(self._forward_flat) if self.has_flow else None
        self._inverse_jit = jax.jit(self._inverse_flat) if self.has_flow else None
        if self.n_bands != frame.n_bands:
            raise PriorLoadError(
                f"decoder weights produce {self.n_bands} bands but frame has {list(frame.bands)}"
            )

    # -- construction -----------------------------------------------------------------------------
    def _build_decoder(self, w):
        fc_w, fc_b = w["decoder.fc.weight"], w["decoder.fc.bias"]
        blocks = _indices(w, "decoder.block{}.conv1.weight")
        out_w = w["decoder.out.weight"]
        self.n_bands = out_w.shape[0]
        self.latent_dim = fc_w.shape[1]
        c0 = w["decoder.block0.conv1.weight"].shape[1] if blocks else out_w.shape[1]
        s0 = int(round(math.sqrt(fc_w.shape[0] / c0)))
        self.s0, self.c0 = s0, c0
        # permute fc rows from (C, H, W) to (H, W, C) order
        perm = np.arange(c0 * s0 * s0).reshape(c0, s0, s0).transpose(1, 2, 0).ravel()
        self._fc_w = jnp.asarray(np.ascontiguousarray(fc_w[perm].T))
        self._fc_b = jnp.asarray(fc_b[perm])
        make = _make_fast_conv if self.fast_grad else _make_conv
        self._dec_blocks = []
        for k in blocks:
            p = f"decoder.block{k}"
            c1 = make(_hwio(w[f"{p}.conv1.weight"]), w[f"{p}.conv1.bias"])
            c2 = make(_hwio(w[f"{p}.conv2.weight"]), w[f"{p}.conv2.bias"])
            self._dec_blocks.append((c1, c2))
        self._dec_out = make(_hwio(out_w), w["decoder.out.bias"])
        self.stamp_size = s0 * 2 ** len(blocks)

    def _build_encoder(self, w):
        self.has_encoder = "encoder.head.weight" in w
        if not self.has_encoder:
            return
        names = ["encoder.stem"] + [
            f"encoder.down{k}" for k in _indices(w, "encoder.down{}.weight")
        ]
        self._enc_convs = [
            _make_conv(_hwio(w[f"{n}.weight"]), w[f"{n}.bias"], stride=1 if j == 0 else 2)
            for j, n in enumerate(names)
        ]
        hw = w["encoder.head.weight"]
        c = w[f"{names[-1]}.weight"].shape[0]
        s = int(round(math.sqrt(hw.shape[1] / c)))
        perm = np.arange(c * s * s).reshape(c, s, s).transpose(1, 2, 0).ravel()
        self._head_w = jnp.asarray(np.ascontiguousarray(hw[:, perm].T))
        self._head_b = jnp.asarray(w["encoder.head.bias"])
        self.encoder_bands = w["encoder.stem.weight"].shape[1]

    def _build_flow(self, w, s_max, context=None):
        self.has_flow = "flow.shift" in w
        if not self.has_flow:
            return
        if s_max is None:
            s_max = self.card.get("architecture", {}).get("flow", {}).get("s_max", 2.0)
        self.s_max = float(s_max)
        self._shift = jnp.asarray(w["flow.shift"])
        self._log_scale = jnp.asarray(w["flow.log_scale"])
        self._couplings = []
        for k in _indices(w, "flow.coupling{}.perm"):
            p = f"flow.coupling{k}"
            mlp = [
                (jnp.asarray(w[f"{p}.mlp{j}.weight"].T), jnp.asarray(w[f"{p}.mlp{j}.bias"]))
                for j in range(3)
            ]
            perm = np.asarray(w[f"{p}.perm"]).astype(np.int32)
            parity = int(w[f"{p}.parity"])
            self._couplings.append((parity, jnp.asarray(perm), jnp.asarray(np.argsort(perm)), mlp))
        #: the magnitude-conditioned base map (:class:`~.flow.MagnitudeConditional`), or None
        self.context = None
        if "flow.context.loc" in w:
            cfg = context or (self.card.get("architecture", {}).get("flow") or {}).get("context")
            if not cfg:
                raise PriorLoadError("the weights hold flow.context.* but the card's "
                                     "architecture.flow has no 'context' entry")
            tril = np.asarray(w["flow.context.scale_tril"], np.float64)
            self.context = {
                "band": str(cfg["band"]), "mag_range": tuple(map(float, cfg["mag_range"])),
                "mag_ref": float(cfg["mag_ref"]), "mag_scale": float(cfg["mag_scale"]),
                "loc": jnp.asarray(w["flow.context.loc"]),
                "weight": jnp.asarray(w["flow.context.weight"]),
                "tril": jnp.asarray(tril, jnp.float32),
                "tril_inv": jnp.asarray(np.linalg.inv(tril), jnp.float32),
                "log_det": float(np.log(np.diag(tril)).sum()),
            }

    # -- decoder ----------------------------------------------------------------------------------
    def decode_logits_nhwc(self, z):
        """``z (N, D)`` -> decoder logits ``(N, y, x, band)``."""
        h = jax.nn.silu(z @ self._fc_w + self._fc_b).reshape(z.shape[0], self.s0, self.s0, self.c0)
        for c1, c2 in self._dec_blocks:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = jax.nn.silu(c2(jax.nn.silu(c1(h))))
        return self._dec_out(h)

    def _decode_block(self, z):
        lg = self.decode_logits_nhwc(z)
        n, h, w_, b = lg.shape
        img = jax.nn.softmax(lg.reshape(n, h * w_, b), axis=1).reshape(n, h, w_, b)
        return jnp.transpose(img, (0, 3, 1, 2))

    def _decode_flat(self, z):
        """``z (N, D)`` -> stamps ``(N, band, y, x)``; on CPU in blocks of
        :data:`CPU_DECODE_BLOCK` latents (``lax.map``) when ``N`` is larger.

        On CPU the decoder's im2col activations of more than ~6 stamps at once fall out of
        cache: a batch of 128 decodes at 3.6 ms per stamp, blocks of 4 at 1.6 ms (JAX 0.10,
        2 cores). Accelerators keep the single large batch."""
        if z.shape[0] <= CPU_DECODE_BLOCK + 2 or jax.default_backend() != "cpu":
            return self._decode_block(z)
        return lax.map(lambda v: self._decode_block(v[None])[0], z,
                       batch_size=CPU_DECODE_BLOCK)

    def decode(self, z, flux=None):
        """``z (..., D)`` -> flux-normalised images ``(..., band, y, x)``, scaled by ``flux``."""
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ArgumentError(
                "z", z.shape, f"Expected event shape ({self.latent_dim},), but got {z.shape}"
            )
        batch, dtype = z.shape[:-1], z.dtype
        img = self._decode_jit(z.reshape(-1, self.latent_dim).astype(jnp.float32))
        img = img.reshape(batch + img.shape[1:]).astype(dtype)
        if flux is not None:
            img = img * jnp.asarray(flux)[..., :, None, None]
        return img

    # -- encoder ----------------------------------------------------------------------------------
    def _encode_flat(self, x):
        s = jnp.clip(x.sum(axis=(-2, -1), keepdims=True), 1e-12, None)
        x = jnp.arcsinh(x / s * (x.shape[-1] * x.shape[-2]))
        h = jnp.transpose(x, (0, 2, 3, 1))
        for conv in self._enc_convs:
            h = jax.nn.silu(conv(h))
        out = h.reshape(h.shape[0], -1) @ self._head_w + self._head_b
        loc, log_scale = jnp.split(out, 2, axis=-1)
        return loc, jnp.exp(log_scale)

    def encode(self, images):
        """Images ``(..., band, y, x)`` (any flux unit) -> ``(loc, scale)`` of ``q(z | x)``."""
        if not self.has_encoder:
            raise PriorLoadError("these weights hold no encoder")
        x = jnp.asarray(images, dtype=jnp.float32)
        if x.ndim < 3 or x.shape[-3] != self.encoder_bands:
            raise ArgumentError("images", x.shape,
                f"images must have shape (..., {self.encoder_bands}, y, x), got {x.shape}"
            )
        batch = x.shape[:-3]
        loc, scale = self._encode_jit(x.reshape((-1,) + x.shape[-3:]))
        return loc.reshape(batch + (-1,)), scale.reshape(batch + (-1,))

    # -- flow -------------------------------------------------------------------------------------
    def _st(self, mlp, cond, n_trans):
        (w0, b0), (w1, b1), (w2, b2) = mlp
        h = jax.nn.silu(cond @ w0 + b0)
        h = jax.nn.silu(h @ w1 + b1)
        h = h @ w2 + b2
        s = self.s_max * jnp.tanh(h[..., :n_trans] / self.s_max)
        return s, h[..., n_trans:]

    def _forward_flat(self, u):
        d = self.latent_dim // 2
        x, logdet = u, jnp.zeros(u.shape[:-1], u.dtype)
        for parity, perm, _, mlp in self._couplings:
            x = x[..., perm]
            a, b = x[..., :d], x[..., d:]
            if parity == 0:
                s, t = self._st(mlp, a, b.shape[-1])
                x = jnp.concatenate([a, b * jnp.exp(s) + t], -1)
            else:
                s, t = self._st(mlp, b, a.shape[-1])
                x = jnp.concatenate([a * jnp.exp(s) + t, b], -1)
            logdet = logdet + s.sum(-1)
        z = x * jnp.exp(self._log_scale) + self._shift
        return z, logdet + self._log_scale.sum()

    def _inverse_flat(self, z):
        d = self.latent_dim // 2
        x = (z - self._shift) * jnp.exp(-self._log_scale)
        logdet = jnp.broadcast_to(-self._log_scale.sum(), z.shape[:-1])
        for parity, _, inv_perm, mlp in reversed(self._couplings):
            a, b = x[..., :d], x[..., d:]
            if parity == 0:
                s, t = self._st(mlp, a, b.shape[-1])
                x = jnp.concatenate([a, (b - t) * jnp.exp(-s)], -1)
            else:
                s, t = self._st(mlp, b, a.shape[-1])
                x = jnp.concatenate([(a - t) * jnp.exp(-s), b], -1)
            logdet = logdet - s.sum(-1)
            x = x[..., inv_perm]
        return x, logdet

    def _apply_flat(self, fn, v):
        v = jnp.asarray(v)
        if v.shape[-1:] != (self.latent_dim,):
            raise ArgumentError(
                "v", v.shape, f"Expected event shape ({self.latent_dim},), but got {v.shape}"
            )
        if not self.has_flow:
            return v, jnp.zeros(v.shape[:-1], v.dtype)
        batch, dtype = v.shape[:-1], v.dtype
        out, logdet = fn(v.reshape(-1, self.latent_dim).astype(jnp.float32))
        return out.reshape(v.shape).astype(dtype), logdet.reshape(batch).astype(dtype)

    def _context_mean(self, mag):
        """Base-space mean of the magnitude-conditioned map for AB magnitudes ``(...)``."""
        ctx = self.context
        phi = magnitude_features(jnp.asarray(mag), ctx["mag_range"], ctx["mag_ref"],
                                 ctx["mag_scale"], ctx["weight"].shape[-1], jnp)
        return ctx["loc"] + phi.astype(jnp.float32) @ ctx["weight"].T

    def flow_forward(self, u, mag=None):
        """Base ``u (..., D)`` -> ``(z, log|det dz/du|)``; identity when there is no flow.
        ``mag`` ``(...)``: AB magnitudes for a prior with a magnitude-conditioned map
        (:class:`~.flow.MagnitudeConditional`; ignored without one)."""
        if mag is None or self.context is None:
            return self._apply_flat(self._forward_jit, u)
        v = self._context_mean(mag) + jnp.asarray(u) @ self.context["tril"].T
        z, logdet = self._apply_flat(self._forward_jit, v)
        return z, logdet + self.context["log_det"]

    def flow_inverse(self, z, mag=None):
        """Latent ``z (..., D)`` -> ``(u, log|det du/dz|)``; identity when there is no flow
        (``mag``: see :meth:`flow_forward`)."""
        v, logdet = self._apply_flat(self._inverse_jit, z)
        if mag is None or self.context is None:
            return v, logdet
        u = (v - self._context_mean(mag)) @ self.context["tril_inv"].T
        return u, logdet - self.context["log_det"]

    def log_prob(self, z, mag=None):
        """Exact log-density of the latent prior at ``z (..., D)`` -> ``(...)`` (given the AB
        magnitudes ``mag`` ``(...)`` for a magnitude-conditioned prior)."""
        u, logdet = self.flow_inverse(z, mag)
        return -0.5 * jnp.sum(u**2, -1) - 0.5 * self.latent_dim * _LOG_2PI + logdet


class LearnedPriorNumPyro(ndist.Distribution):
    """NumPyro distribution over the latent ``z``, twin of the torch ``LearnedPrior``.

    ``event_shape = (D,)``, ``support = real_vector``; :meth:`sample` draws through the latent
    flow (or ``N(0, I)``), :meth:`log_prob` is the exact log-density, :meth:`decode` gives
    flux-normalised images ``(..., band, y, x)`` in the model frame. Shapes follow NumPyro:
    ``sample(key, sample_shape)`` has shape ``sample_shape + batch_shape + event_shape``.

    >>> prior = load_prior("lsst-vae").to_numpyro()        # doctest: +SKIP
    >>> z = numpyro.sample("z", prior)                     # doctest: +SKIP
    >>> image = prior.decode(z, flux)                      # doctest: +SKIP
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []
    pytree_aux_fields = ("twin",)
    pytree_data_fields = ("mag",)

    def __init__(self, twin: JaxPrior, batch_shape=(), validate_args=None, mag=None):
        self.twin = twin
        self.mag = None if mag is None or twin.context is None else jnp.asarray(mag)
        super().__init__(
            batch_shape=tuple(batch_shape),
            event_shape=(twin.latent_dim,),
            validate_args=validate_args,
        )

    # descriptive attributes, as in the torch prior
    @property
    def frame(self) -> ModelFrame:
        return self.twin.frame

    @property
    def bands(self) -> tuple[str, ...]:
        return self.twin.frame.bands

    @property
    def latent_dim(self) -> int:
        return self.twin.latent_dim

    @property
    def card(self) -> dict:
        return self.twin.card

    @property
    def name(self) -> str:
        return str(self.twin.card.get("name", "unnamed-prior"))

    @property
    def has_rsample(self) -> bool:
        return True

    @property
    def magnitude_band(self) -> str | None:
        """See the torch prior's ``magnitude_band``."""
        return None if self.twin.context is None else self.twin.context["band"]

    def given_magnitude(self, mag) -> LearnedPriorNumPyro:
        """This prior conditioned on AB magnitude(s) ``mag`` (see the torch prior's
        ``given_magnitude``)."""
        return LearnedPriorNumPyro(self.twin, self.batch_shape, self._validate_args, mag)

    def expand(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        jnp.broadcast_shapes(self.batch_shape, batch_shape)  # raises if not expandable
        return LearnedPriorNumPyro(self.twin, batch_shape, validate_args=self._validate_args,
                                   mag=self.mag)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        u = jax.random.normal(key, shape, dtype=jnp.float32)
        return self.twin.flow_forward(u, self.mag)[0]

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def log_prob(self, value):
        shape = jnp.shape(value)
        if tuple(shape[-1:]) != self.event_shape:
            raise ArgumentError(
                "value", tuple(shape),
                f"Expected event shape {self.event_shape}, but got {tuple(shape)}"
            )
        lp = self.twin.log_prob(value, self.mag)
        return jnp.broadcast_to(lp, jnp.broadcast_shapes(lp.shape, self.batch_shape))

    def decode(self, z, flux=None):
        """See :meth:`JaxPrior.decode`."""
        return self.twin.decode(z, flux)

    def encode(self, images):
        """See :meth:`JaxPrior.encode`."""
        return self.twin.encode(images)
