"""A RealNVP latent flow that models the VAE's aggregate posterior (torch).

The VAE is trained with a standard normal prior on ``z``, but the *aggregate posterior*
``q(z) = E_x[q(z | x)]`` of a trained VAE is not standard normal: sampling ``N(0, I)`` and
decoding gives implausible galaxies in the gaps. A normalising flow fitted by maximum likelihood
to samples of ``q(z | x)`` over the training set corrects this (as in MADNESS, Biswas et al. 2025).

Transform
---------
``forward`` maps base ``u ~ N(0, I_D)`` to latent ``z``; ``inverse`` maps back. Layers, in the
forward direction:

1. ``L`` affine coupling layers. Layer ``k`` permutes its input with a fixed random permutation
   ``perm_k`` (a buffer, saved with the weights), splits it into halves ``a = x[:d]``,
   ``b = x[d:]`` (``d = D // 2``), and maps ``b -> b * exp(s(a)) + t(a)`` if ``k`` is even, or
   ``a -> a * exp(s(b)) + t(b)`` if ``k`` is odd (alternating halves). ``s`` and ``t`` come from
   an MLP (two hidden layers, SiLU) and ``s = s_max * tanh(s_raw / s_max)`` is bounded.
2. An elementwise affine map ``z = x * exp(log_scale) + shift`` (learnable location and scale).

``log_prob(z) = log N(inverse(z); 0, I) - log|det d forward / du|`` is the exact log-density.

Magnitude conditioning (optional, :class:`MagnitudeConditional`)
-----------------------------------------------------------------
Galaxy sizes and profiles change with brightness (fainter galaxies are smaller), which a prior
on the morphology alone cannot know: at low S/N a faint galaxy is pulled towards the population's
typical, larger galaxy, and its flux comes out high. A flow may therefore carry a
*linear-Gaussian map in its base space* conditioned on the AB magnitude ``m`` of one band::

    c = (clip(m, m_lo, m_hi) - m_ref) / m_scale,      phi(c) = (c, c^2, ..., c^degree)
    v = loc + W phi(c) + L u,        u ~ N(0, I)       (L lower triangular, positive diagonal)
    z = flow(v)

so ``p(z | m)`` is the flow's push-forward of ``N(loc + W phi(c), L L^T)``. It is fitted by
least squares of ``inverse(z)`` on ``phi(c)`` over encoded training galaxies with known
magnitudes (:func:`probdeblend.priors.train.fit_magnitude_conditional`); the flow itself is
unchanged, and without a magnitude (``mag=None``) every method gives the unconditional prior.
``u`` stays standard normal, so samplers keep a whitened parametrisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["LatentFlow", "MagnitudeConditional", "magnitude_features"]

_LOG_2PI = math.log(2.0 * math.pi)


class _Coupling(nn.Module):
    def __init__(self, dim: int, hidden: int, parity: int, perm: torch.Tensor, s_max: float):
        super().__init__()
        self.dim, self.parity, self.s_max = dim, parity, float(s_max)
        d = dim // 2
        # even layers: condition on the first d entries, transform the last dim - d
        self.n_cond, self.n_trans = (d, dim - d) if parity == 0 else (dim - d, d)
        self.net = nn.Sequential(
            nn.Linear(self.n_cond, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * self.n_trans),
        )
        nn.init.zeros_(self.net[-1].weight)  # start at the identity map
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("perm", perm.clone())
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _split(self, x):
        d = self.dim // 2
        a, b = x[..., :d], x[..., d:]
        return (a, b) if self.parity == 0 else (b, a)  # (conditioning, transformed)

    def _join(self, cond, trans):
        return torch.cat((cond, trans), -1) if self.parity == 0 else torch.cat((trans, cond), -1)

    def _st(self, cond):
        h = self.net(cond)
        s_raw, t = h[..., : self.n_trans], h[..., self.n_trans :]
        s = self.s_max * torch.tanh(s_raw / self.s_max)
        return s, t

    def forward(self, x):
        x = x[..., self.perm]
        cond, trans = self._split(x)
        s, t = self._st(cond)
        return self._join(cond, trans * torch.exp(s) + t), s.sum(-1)

    def inverse(self, y):
        cond, trans = self._split(y)
        s, t = self._st(cond)
        x = self._join(cond, (trans - t) * torch.exp(-s))
        return x[..., self.inv_perm], -s.sum(-1)


def magnitude_features(mag, mag_range, mag_ref: float, mag_scale: float, degree: int, xp):
    """``phi(c) = (c, c^2, ..., c^degree)`` ``(..., degree)`` of AB magnitudes ``(...)``,
    ``c = (clip(mag, *mag_range) - mag_ref) / mag_scale``, in the array namespace ``xp``
    (``numpy``, ``torch`` or ``jax.numpy``): the one definition the torch map, its JAX twin
    and the least-squares fit share."""
    c = (xp.clip(mag, mag_range[0], mag_range[1]) - mag_ref) / mag_scale
    return xp.stack([c ** (k + 1) for k in range(int(degree))], -1)


class MagnitudeConditional(nn.Module):
    """The magnitude-conditioned base map of a :class:`LatentFlow` (see the module docstring).

    Parameters
    ----------
    loc : array (D,)
    weight : array (D, degree)
    scale_tril : array (D, D)
        Lower triangular with a positive diagonal.
    band : str
        The band whose AB magnitude conditions the prior.
    mag_range : (float, float)
        Magnitudes are clipped to this range (the training galaxies' range: no extrapolation).
    mag_ref, mag_scale : float
        Standardisation ``c = (m - mag_ref) / mag_scale``.
    """

    def __init__(self, loc, weight, scale_tril, band: str, mag_range, mag_ref: float,
                 mag_scale: float):
        super().__init__()
        t = torch.as_tensor
        self.register_buffer("loc", t(np.asarray(loc, np.float32)))
        self.register_buffer("weight", t(np.asarray(weight, np.float32)))
        self.register_buffer("scale_tril", t(np.asarray(scale_tril, np.float32)))
        self.band, self.mag_ref, self.mag_scale = str(band), float(mag_ref), float(mag_scale)
        self.mag_range = (float(mag_range[0]), float(mag_range[1]))

    @classmethod
    def fit(cls, u, mags, band: str, degree: int = 2, mag_range=None,
            mag_ref: float | None = None, mag_scale: float | None = None
            ) -> MagnitudeConditional:
        """Least-squares fit to base vectors ``u (N, D)`` of galaxies with AB magnitudes
        ``mags (N,)``: ``loc`` and ``W`` by ordinary least squares on ``phi(c)``, ``L`` the
        Cholesky factor of the residual covariance. ``mag_range`` defaults to the range of
        ``mags``, ``mag_ref`` / ``mag_scale`` to their median and standard deviation."""
        u = np.asarray(u, np.float64)
        m = np.asarray(mags, np.float64).reshape(-1)
        lo, hi = (float(m.min()), float(m.max())) if mag_range is None else map(float, mag_range)
        ref = float(np.median(m)) if mag_ref is None else float(mag_ref)
        scale = float(np.std(m)) if mag_scale is None else float(mag_scale)
        phi = magnitude_features(m, (lo, hi), ref, scale, degree, np)
        x = np.concatenate([np.ones((len(m), 1)), phi], -1)
        coef, *_ = np.linalg.lstsq(x, u, rcond=None)          # (1 + degree, D)
        resid = u - x @ coef
        cov = resid.T @ resid / max(len(u) - x.shape[1], 1)
        tril = np.linalg.cholesky(cov + 1e-9 * np.eye(len(cov)))
        return cls(coef[0], coef[1:].T, tril, band, (lo, hi), ref, scale)

    @property
    def degree(self) -> int:
        return int(self.weight.shape[-1])

    def config(self) -> dict:
        return {"band": self.band, "mag_range": list(self.mag_range), "mag_ref": self.mag_ref,
                "mag_scale": self.mag_scale, "degree": self.degree}

    def export_weights(self, prefix: str = "flow.context") -> dict:
        """``{prefix}.loc`` (D,), ``{prefix}.weight`` (D, degree), ``{prefix}.scale_tril``
        (D, D); the scalars are in :meth:`config`."""
        return {f"{prefix}.{k}": getattr(self, k).detach().cpu().numpy().copy()
                for k in ("loc", "weight", "scale_tril")}

    def mean(self, mag: torch.Tensor) -> torch.Tensor:
        """Base-space mean ``loc + W phi(c)`` for magnitudes ``(...)`` -> ``(..., D)``."""
        phi = magnitude_features(mag, self.mag_range, self.mag_ref, self.mag_scale,
                                 self.degree, torch)
        return self.loc + phi.to(self.weight.dtype) @ self.weight.T

    def log_det(self) -> torch.Tensor:
        """``log|det L|``."""
        return torch.log(torch.diagonal(self.scale_tril)).sum()


class LatentFlow(nn.Module):
    """RealNVP flow on ``R^dim`` with a standard normal base (see module docstring).

    Parameters
    ----------
    dim : int
        Latent dimension ``D`` (>= 2).
    n_layers : int
        Number of affine coupling layers.
    hidden : int
        Width of the two hidden layers of each conditioner MLP.
    s_max : float
        Bound of the per-layer log-scales (``|s| < s_max``).
    seed : int
        Seed of the fixed permutations (weights use torch's global RNG).
    """

    def __init__(
        self, dim: int, n_layers: int = 8, hidden: int = 128, s_max: float = 2.0, seed: int = 0
    ):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
        self.dim, self.n_layers, self.hidden, self.s_max = (
            int(dim),
            int(n_layers),
            int(hidden),
            float(s_max),
        )
        g = torch.Generator().manual_seed(int(seed))
        layers = []
        for k in range(n_layers):
            perm = torch.arange(dim) if k == 0 else torch.randperm(dim, generator=g)
            layers.append(_Coupling(dim, hidden, k % 2, perm, s_max))
        self.layers = nn.ModuleList(layers)
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.context: MagnitudeConditional | None = None  # see the module docstring

    def config(self) -> dict:
        out = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "s_max": self.s_max,
        }
        if self.context is not None:
            out["context"] = self.context.config()
        return out

    def attach_context(self, context: dict) -> MagnitudeConditional:
        """Attach a :class:`MagnitudeConditional` built from its :meth:`~MagnitudeConditional.
        config` (``band``, ``mag_range``, ``mag_ref``, ``mag_scale``, ``degree``), with
        placeholder arrays (identity map) for ``load_state_dict`` to fill; returns it."""
        d, k = self.dim, int(context["degree"])
        self.context = MagnitudeConditional(
            np.zeros(d), np.zeros((d, k)), np.eye(d), context["band"], context["mag_range"],
            context["mag_ref"], context["mag_scale"])
        return self.context

    def export_weights(self, prefix: str = "flow") -> dict:
        """Weights under stable semantic names (numpy arrays), for the JAX twin.

        ``{prefix}.shift`` and ``{prefix}.log_scale`` (the final affine map), and for coupling
        layer ``k = 0 .. n_layers - 1``: ``{prefix}.coupling{k}.perm`` (int64 permutation applied
        first), ``{prefix}.coupling{k}.parity`` (0-d int: 0 transforms the second half
        conditioned on the first, 1 the reverse) and ``{prefix}.coupling{k}.mlp{j}.{weight,bias}``
        for the conditioner's three dense layers ``j = 0, 1, 2`` (SiLU between them; the output
        holds ``s_raw`` then ``t``). ``s_max`` is :attr:`s_max`. With a :attr:`context` map,
        also ``{prefix}.context.*`` (:meth:`MagnitudeConditional.export_weights`).
        """
        out = {} if self.context is None else self.context.export_weights(f"{prefix}.context")
        out |= {
            f"{prefix}.shift": self.shift.detach().cpu().numpy().copy(),
            f"{prefix}.log_scale": self.log_scale.detach().cpu().numpy().copy(),
        }
        for k, layer in enumerate(self.layers):
            p = f"{prefix}.coupling{k}"
            out[f"{p}.perm"] = layer.perm.detach().cpu().numpy().copy()
            out[f"{p}.parity"] = np.asarray(layer.parity, dtype=np.int64)
            linears = [m for m in layer.net if isinstance(m, nn.Linear)]
            for j, lin in enumerate(linears):
                out[f"{p}.mlp{j}.weight"] = lin.weight.detach().cpu().numpy().copy()
                out[f"{p}.mlp{j}.bias"] = lin.bias.detach().cpu().numpy().copy()
        return out

    def forward(self, u: torch.Tensor, mag: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base ``u`` -> latent ``z``; returns ``(z, log|det dz/du|)``. ``mag`` ``(...)``:
        AB magnitudes for a flow with a :attr:`context` map (ignored without one)."""
        logdet = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        x = u
        if mag is not None and self.context is not None:
            ctx = self.context
            x = ctx.mean(mag) + u @ ctx.scale_tril.T
            logdet = logdet + ctx.log_det()
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        z = x * torch.exp(self.log_scale) + self.shift
        return z, logdet + self.log_scale.sum()

    def inverse(self, z: torch.Tensor, mag: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z`` -> base ``u``; returns ``(u, log|det du/dz|)`` (``mag``: see
        :meth:`forward`)."""
        x = (z - self.shift) * torch.exp(-self.log_scale)
        logdet = (-self.log_scale.sum()).expand(z.shape[:-1])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        if mag is not None and self.context is not None:
            ctx = self.context
            d = (x - ctx.mean(mag)).unsqueeze(-1)
            tril = ctx.scale_tril.expand(d.shape[:-2] + ctx.scale_tril.shape)
            x = torch.linalg.solve_triangular(tril, d, upper=False).squeeze(-1)
            logdet = logdet - ctx.log_det()
        return x, logdet

    def log_prob(self, z: torch.Tensor, mag: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density of ``z`` (shape ``(..., dim)`` -> ``(...)``), given the AB
        magnitudes ``mag`` ``(...)`` for a flow with a :attr:`context` map."""
        u, logdet = self.inverse(z, mag)
        return -0.5 * (u**2).sum(-1) - 0.5 * self.dim * _LOG_2PI + logdet

    def rsample(self, sample_shape=(), mag: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised samples, shape ``sample_shape + (dim,)`` (int ``n`` means ``(n,)``);
        ``mag`` broadcasts against ``sample_shape``."""
        if isinstance(sample_shape, int):
            sample_shape = (sample_shape,)
        p = self.shift
        u = torch.randn(tuple(sample_shape) + (self.dim,), dtype=p.dtype, device=p.device)
        return self.forward(u, mag)[0]

    def sample(self, sample_shape=(), mag: torch.Tensor | None = None) -> torch.Tensor:
        """Like :meth:`rsample` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, mag)
