"""Pixel likelihood of a scene: independent Gaussian noise with the per-pixel variance.

``log p(d | m) = sum_pixels [ -0.5 w (d - m)^2 + 0.5 log(w / 2 pi) ]`` over unmasked pixels, with
``w = 1 / variance`` (0 for masked pixels, which then contribute nothing). At full survey depth
the sky is >= 1e3 electrons per pixel, where this Gaussian is the accurate limit of the Poisson
likelihood; the variance is held fixed (it does not depend on the model).

Backend-agnostic: ``xp`` is ``torch`` or ``jax.numpy``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_loglike", "pixel_loglike", "log_normaliser"]


def log_normaliser(weight: np.ndarray) -> float:
    """``sum 0.5 log(w / 2 pi)`` over unmasked pixels (a constant of the data), in nats."""
    w = np.asarray(weight, dtype=np.float64)
    good = w > 0
    return float(0.5 * np.sum(np.log(w[good] / (2 * np.pi))))


def pixel_loglike(model, image, weight, xp=None):
    """Per-pixel log-likelihood (..., band, y, x) *without* the normalising constant.

    ``-0.5 * weight * (image - model)**2``; masked pixels (weight 0) give exactly 0.
    """
    return -0.5 * weight * (image - model) ** 2


def gaussian_loglike(model, image, weight, xp=None, normaliser: float = 0.0):
    """Total log-likelihood of a scene, summed over band, y, x (leading axes kept).

    Parameters
    ----------
    model : array (..., band, y, x)
        Noiseless model scene in image units.
    image, weight : arrays (band, y, x)
        Observed image and inverse variance (0 = masked).
    xp : module, unused
        Kept for symmetry with :func:`probdeblend.render.render`.
    normaliser : float
        Add :func:`log_normaliser` of the weights to get the normalised log-density.
    """
    return pixel_loglike(model, image, weight).sum((-3, -2, -1)) + normaliser
