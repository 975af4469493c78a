"""Pixel likelihood of a scene: independent Gaussian noise with the per-pixel variance.

``log p(d | m) = sum_pixels [ -0.5 ((d - m) / sigma)^2 - log sigma - 0.5 log 2 pi ]`` over
unmasked pixels; masked pixels (zero weight) contribute nothing. The variance is fixed (it does
not depend on the model): at full survey depth the sky is >= 1e3 electrons per pixel in the
ground-based bands, where this Gaussian is the accurate limit of the Poisson likelihood.

The functions are backend-agnostic: ``xp`` is ``numpy``, ``torch`` or ``jax.numpy``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["chi2_loglike", "log_normalisation", "loglike_per_band"]


def chi2_loglike(model, image, sigma, good, xp):
    """``-0.5 * sum(((image - model) / sigma)^2)`` over unmasked pixels, summed over the last
    three axes (band, y, x): the log-likelihood up to a constant of the data. This is what the
    samplers see (float32 keeps ~1e-3 nat precision on it)."""
    resid = xp.where(good, (image - model) / sigma, 0.0)
    return -0.5 * (resid**2).sum((-3, -2, -1))


def log_normalisation(sigma, good, xp):
    """``sum(-log sigma - 0.5 log 2 pi)`` over unmasked pixels, per band (band,): what
    :func:`loglike_per_band` adds to the chi^2 term of :func:`chi2_loglike`."""
    return xp.where(good, -xp.log(sigma) - 0.5 * np.log(2 * np.pi), 0.0).sum((-2, -1))


def loglike_per_band(model, image, sigma, good, xp):
    """Normalised Gaussian log-likelihood per band, shape (..., band)."""
    resid = xp.where(good, (image - model) / sigma, 0.0)
    return (-0.5 * resid**2).sum((-2, -1)) + log_normalisation(sigma, good, xp)
