"""Learned generative priors of isolated galaxies (VAE / VAE-GAN + latent flow).

* :class:`ModelFrame` - bands, pixel grid and model PSF of a prior (:mod:`.frame`).
* :func:`load_prior` - a shipped or saved prior as a Pyro distribution (:class:`LearnedPrior`)
  with ``decode(z)``; ``prior.to_numpyro()`` gives its JAX/NumPyro twin
  (:class:`LearnedPriorNumPyro`).
* :func:`train_prior`, :func:`fit_flow`, :func:`save_prior`, :func:`build_prior` - training.
* :class:`Encoder`, :class:`Decoder`, :class:`Discriminator`, :class:`LatentFlow` - networks.

See ``docs/priors.md``. The JAX twin is imported lazily (``import jax`` only when used).
"""

from __future__ import annotations

from .distribution import LearnedPrior
from .flow import LatentFlow
from .frame import LSST_FRAME, ModelFrame
from .io import list_priors, load_prior, read_card, save_prior, shipped_priors_dir
from .nets import DEFAULT_CHANNELS, Decoder, Discriminator, Encoder, encoder_input
from .train import TrainConfig, build_prior, fit_flow, train_prior

__all__ = [
    "ModelFrame",
    "LSST_FRAME",
    "LearnedPrior",
    "LearnedPriorNumPyro",
    "JaxPrior",
    "load_prior",
    "save_prior",
    "read_card",
    "list_priors",
    "shipped_priors_dir",
    "Encoder",
    "Decoder",
    "Discriminator",
    "LatentFlow",
    "encoder_input",
    "DEFAULT_CHANNELS",
    "TrainConfig",
    "train_prior",
    "fit_flow",
    "build_prior",
]


def __getattr__(name):
    if name in ("LearnedPriorNumPyro", "JaxPrior"):
        from . import jax_twin

        return getattr(jax_twin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
