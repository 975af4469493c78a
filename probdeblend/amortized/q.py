"""The amortized posterior q of one source: a Gaussian over named parameter groups.

q is a table of named groups, concatenated into one vector ``v`` per source (BLISS's
``variational_dist`` pattern, without loose loc / scale dicts)::

    v = [ z (D) | log_flux (B) | offset (2) | e (2, optional) ]

* ``z``: the prior's latent morphology vector;
* ``log_flux``: natural log of the total flux per band, in the scene's flux unit;
* ``offset``: ``(dx, dy)`` pixels from the cutout centre;
* ``e``: reduced shear ``(g1, g2)`` of the PSF-free galaxy (GalSim convention, see
  :mod:`probdeblend.measure`), as :func:`probdeblend.measure.shape_torch` measures the decoded
  ``z``; present when the encoder has a shape head. It lets the fast path give ellipticity draws
  without decoding every draw.

The covariance is diagonal plus low rank, written in units of the per-dimension scales::

    Sigma = S (I + W W^T) S,      S = diag(scale),  W (P, r) with r = rank (0: diagonal)

so the marginal standard deviation of dimension ``i`` is ``scale_i sqrt(1 + sum_k W_ik^2)``.
Draws are ``v = loc + S (eps + W xi)`` with ``eps ~ N(0, I_P)``, ``xi ~ N(0, I_r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AmortizedQ", "q_nll"]

_LOG_2PI = math.log(2.0 * math.pi)


def q_nll(target: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
          factor: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-density of ``target`` under q, one value per row (training loss).

    Parameters
    ----------
    target, loc, log_scale : Tensor (N, P)
    factor : Tensor (N, P, r), optional
        ``W`` of the module docstring (None: diagonal q).
    """
    u = (target - loc) * torch.exp(-log_scale)  # whitened by S
    base = 0.5 * (u * u).sum(-1) + log_scale.sum(-1) + 0.5 * target.shape[-1] * _LOG_2PI
    if factor is None or factor.shape[-1] == 0:
        return base
    # (I + W W^T)^-1 = I - W (I_r + W^T W)^-1 W^T ; det(I + W W^T) = det(I_r + W^T W)
    r = factor.shape[-1]
    cap = torch.eye(r, device=factor.device, dtype=factor.dtype) + factor.transpose(-1, -2) @ factor
    chol = torch.linalg.cholesky(cap)
    wu = (factor.transpose(-1, -2) @ u.unsqueeze(-1))  # (N, r, 1)
    sol = torch.cholesky_solve(wu, chol)
    quad_corr = (wu * sol).sum((-1, -2))
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return base - 0.5 * quad_corr + 0.5 * logdet


@dataclass
class AmortizedQ:
    """q for ``S`` sources (numpy, float64).

    Attributes
    ----------
    loc, scale : ndarray (S, P)
    factor : ndarray (S, P, r)
    groups : dict name -> width, in vector order
    centres : ndarray (S, 2)
        Scene ``(x, y)`` of the cutout centres the offsets refer to.
    """

    loc: np.ndarray
    scale: np.ndarray
    factor: np.ndarray
    groups: dict
    centres: np.ndarray

    @property
    def n_sources(self) -> int:
        return int(self.loc.shape[0])

    def slice(self, name: str) -> slice:
        """Position of group ``name`` in the joint vector."""
        start = 0
        for k, w in self.groups.items():
            if k == name:
                return slice(start, start + w)
            start += w
        raise KeyError(f"q has no group {name!r}; groups are {list(self.groups)}")

    def covariance(self) -> np.ndarray:
        """Full covariance (S, P, P)."""
        s = self.scale
        inner = np.eye(s.shape[-1])[None] + self.factor @ np.swapaxes(self.factor, -1, -2)
        return s[:, :, None] * inner * s[:, None, :]

    def mean(self, name: str) -> np.ndarray:
        return self.loc[:, self.slice(name)]

    def sd(self, name: str) -> np.ndarray:
        """Marginal standard deviations of group ``name`` (S, width)."""
        sl = self.slice(name)
        return self.scale[:, sl] * np.sqrt(1.0 + (self.factor[:, sl] ** 2).sum(-1))

    def sample(self, num_samples: int, rng: np.random.Generator,
               groups=None) -> dict[str, np.ndarray]:
        """Independent draws, per group ``(num_samples, S, width)``; ``offset`` draws are
        also returned as scene positions ``position`` = centres + offset.

        ``groups``: names of the groups to draw (default all), e.g. ``("offset", "e")`` for
        a catalogue that needs no latent draws: the joint law of those groups is the same
        (the rank-``r`` factor's shared draws couple them as in the full vector), at a
        fraction of the cost. Draws of a subset differ from the same groups of a full draw
        with the same ``rng`` (fewer normals are drawn)."""
        names = list(self.groups) if groups is None else [str(g) for g in groups]
        spans = [self.slice(k) for k in names]  # KeyError naming the groups for an unknown one
        idx = np.r_[tuple(spans)].astype(np.int64) if spans else np.zeros(0, np.int64)
        n, S, r = int(num_samples), self.loc.shape[0], self.factor.shape[-1]
        eps = rng.standard_normal((n, S, len(idx)))
        if r:
            eps = eps + np.einsum("spr,nsr->nsp", self.factor[:, idx],
                                  rng.standard_normal((n, S, r)))
        v = self.loc[None, :, idx] + self.scale[None, :, idx] * eps
        out, start = {}, 0
        for k in names:
            w = self.groups[k]
            out[k] = v[..., start:start + w]
            start += w
        if "offset" in out:
            out["position"] = self.centres[None] + out["offset"]
        return out

    def rescaled(self, widths: dict) -> AmortizedQ:
        """q with the marginal widths of some groups recalibrated: ``{name: (c, gamma)}``
        maps each dimension's marginal sd ``s`` of group ``name`` to ``c * s ** gamma``.

        This is the diagonal linear map ``v -> loc + D (v - loc)`` of q (``D_ii = c *
        s_i ** (gamma - 1)`` on the group, 1 elsewhere), so q stays a joint Gaussian of the
        same low-rank form and correlations are kept. Widths fitted on held-out simulations
        (``benchmarks/calibrate_q.py``) correct a q that training left over- or
        under-dispersed. Unknown names are ignored.
        """
        scale = self.scale.copy()
        for name, (c, gamma) in widths.items():
            if name not in self.groups:
                continue
            sl = self.slice(name)
            sd = self.sd(name)
            scale[:, sl] *= float(c) * sd ** (float(gamma) - 1.0)
        return AmortizedQ(self.loc, scale, self.factor, self.groups, self.centres)

    def take(self, index, shift=(0.0, 0.0)) -> AmortizedQ:
        """q of the sources ``index`` (int array, any order), their cutout centres moved by
        ``shift`` (pixels ``(dx, dy)``: e.g. minus the origin of a sub-scene)."""
        i = np.asarray(index, np.int64)
        return AmortizedQ(self.loc[i], self.scale[i], self.factor[i], self.groups,
                          self.centres[i] + np.asarray(shift, np.float64))

    @staticmethod
    def concatenate(qs) -> AmortizedQ:
        """One q of the sources of several (same groups and rank), in order."""
        qs = list(qs)
        return AmortizedQ(*(np.concatenate([getattr(q, k) for q in qs])
                            for k in ("loc", "scale", "factor")), qs[0].groups,
                          np.concatenate([q.centres for q in qs]))

    def recentred(self, **locs) -> AmortizedQ:
        """q moved to new means of some groups (``name=array (S, width)``), widths and
        correlations unchanged: e.g. centred on a refined morphology."""
        loc = self.loc.copy()
        for name, value in locs.items():
            loc[:, self.slice(name)] = np.asarray(value, np.float64).reshape(len(loc), -1)
        return AmortizedQ(loc, self.scale, self.factor, self.groups, self.centres)

    def log_prob(self, values: np.ndarray) -> np.ndarray:
        """log q of joint vectors ``values`` (..., S, P) -> (..., S)."""
        t = torch.as_tensor(np.asarray(values, np.float64))
        lead = t.shape[:-2]
        loc = torch.as_tensor(self.loc).expand(*lead, *self.loc.shape)
        ls = torch.log(torch.as_tensor(self.scale)).expand(*lead, *self.scale.shape)
        f = torch.as_tensor(self.factor).expand(*lead, *self.factor.shape)
        return -q_nll(t, loc, ls, f).numpy()
