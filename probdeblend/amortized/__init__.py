"""Amortized posterior of the galaxy at the centre of a cutout of a blended scene.

One forward pass of :class:`AmortizedEncoder` per detected source gives a diagonal Gaussian
``q`` over

* ``z`` - the latent morphology vector of a learned prior (:func:`probdeblend.load_prior`),
* ``log_flux`` - the natural log of the total flux per band, in the scene's flux units,
* ``offset`` - the sub-pixel position ``(dx, dy)`` of the galaxy relative to the cutout centre.

This is the "second encoder trained on blends with the decoder frozen" of Arcelin et al. (2021),
trained here with *supervised* targets taken from the frozen prior (see :class:`TrainingSet`).
Users call :meth:`AmortizedPosterior.predict` on a :class:`~probdeblend.Scene`; refinement
(importance reweighting with the scene likelihood, SVI, NUTS) starts from its output. See
``docs/amortized.md``.

Conventions
-----------
Cutouts
    ``stamp_size x stamp_size`` windows of the scene whose centre, pixel coordinate
    ``c = (n - 1) / 2`` of the cutout, is as close as possible to the given position: the window
    starts at ``i0 = floor(x - c + 0.5)`` (same in y), so ``|x - (i0 + c)| <= 0.5``. Parts of the
    window outside the image are zero with weight 0. Pixel coordinates are those of
    :class:`~probdeblend.Scene` (0-based, pixel centres on integers).
Offsets
    ``(dx, dy)`` in scene pixels from the cutout centre: the galaxy's centre in the scene is
    ``cutout_centre + offset``.
Input normalisation
    :func:`cutout_input` (units-free, works at any survey depth and in any flux unit).
Dihedral augmentation
    The 8 symmetries of the square (:func:`dihedral`, :data:`DIHEDRAL_MATRICES`); transforming
    a cutout by ``g`` moves an offset ``o`` to ``DIHEDRAL_MATRICES[g] @ o``.
"""


from .constants import AMORTIZED_CHANNELS, ASINH_SOFTENING, KIND, LOG_SCALE_BOUNDS, SUFFIX
from .features import (
    CENTROID_WINDOWS,
    DIHEDRAL_MATRICES,
    band_features,
    centroid_features,
    cutout_input,
    dihedral,
    noise_sigma,
    psf_fwhm_pixels,
    windowed_centroid,
)
from .io import list_amortized, read_amortized, save_amortized
from .network import AmortizedEncoder, gaussian_nll
from .posterior import AmortizedPosterior, load_amortized
from .train import (
    AmortizedTrainConfig,
    build_amortized,
    evaluate_amortized,
    measure_throughput,
    split_scenes,
    train_amortized,
)
from .training_set import TrainingSet

__all__ = [
    "AMORTIZED_CHANNELS",
    "ASINH_SOFTENING",
    "CENTROID_WINDOWS",
    "DIHEDRAL_MATRICES",
    "KIND",
    "LOG_SCALE_BOUNDS",
    "SUFFIX",
    "AmortizedEncoder",
    "AmortizedPosterior",
    "AmortizedTrainConfig",
    "TrainingSet",
    "band_features",
    "build_amortized",
    "centroid_features",
    "cutout_input",
    "dihedral",
    "evaluate_amortized",
    "gaussian_nll",
    "list_amortized",
    "load_amortized",
    "measure_throughput",
    "noise_sigma",
    "psf_fwhm_pixels",
    "read_amortized",
    "save_amortized",
    "split_scenes",
    "train_amortized",
    "windowed_centroid",
]
