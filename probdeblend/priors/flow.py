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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["LatentFlow"]

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

    def config(self) -> dict:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "s_max": self.s_max,
        }

    def export_weights(self, prefix: str = "flow") -> dict:
        """Weights under stable semantic names (numpy arrays), for the JAX twin.

        ``{prefix}.shift`` and ``{prefix}.log_scale`` (the final affine map), and for coupling
        layer ``k = 0 .. n_layers - 1``: ``{prefix}.coupling{k}.perm`` (int64 permutation applied
        first), ``{prefix}.coupling{k}.parity`` (0-d int: 0 transforms the second half
        conditioned on the first, 1 the reverse) and ``{prefix}.coupling{k}.mlp{j}.{weight,bias}``
        for the conditioner's three dense layers ``j = 0, 1, 2`` (SiLU between them; the output
        holds ``s_raw`` then ``t``). ``s_max`` is :attr:`s_max`.
        """
        out = {
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

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base ``u`` -> latent ``z``; returns ``(z, log|det dz/du|)``."""
        logdet = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        x = u
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        z = x * torch.exp(self.log_scale) + self.shift
        return z, logdet + self.log_scale.sum()

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z`` -> base ``u``; returns ``(u, log|det du/dz|)``."""
        x = (z - self.shift) * torch.exp(-self.log_scale)
        logdet = (-self.log_scale.sum()).expand(z.shape[:-1])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact log-density of ``z`` (shape ``(..., dim)`` -> ``(...)``)."""
        u, logdet = self.inverse(z)
        return -0.5 * (u**2).sum(-1) - 0.5 * self.dim * _LOG_2PI + logdet

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """Reparameterised samples, shape ``sample_shape + (dim,)`` (int ``n`` means ``(n,)``)."""
        if isinstance(sample_shape, int):
            sample_shape = (sample_shape,)
        p = self.shift
        u = torch.randn(tuple(sample_shape) + (self.dim,), dtype=p.dtype, device=p.device)
        return self.forward(u)[0]

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Like :meth:`rsample` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape)
