"""Constants shared by the amortized modules."""

import math

#: Default channel widths of the convolutional stack.
AMORTIZED_CHANNELS: tuple[int, ...] = (32, 64, 128, 128)
#: ``x / sigma`` is divided by this before the asinh (see :func:`cutout_input`).
ASINH_SOFTENING = 3.0
#: Soft bounds of the predicted log standard deviations (scales in ``[9e-4, 20]``).
LOG_SCALE_BOUNDS = (-7.0, 3.0)
#: Card ``kind`` of amortized models.
KIND = "amortized"
#: Suffix of the shipped amortized model of a prior: ``<prior-name>-amortized``.
SUFFIX = "-amortized"
_FORMAT_VERSION = 1
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
_LOG_2PI = math.log(2.0 * math.pi)
_MIN_FWHM_PX = _FWHM_PER_SIGMA * math.sqrt(1.0 / 12.0)  # 0.68 px
_REQUIRED_CARD_KEYS = ("name", "kind", "architecture", "frame", "prior", "sha256")

