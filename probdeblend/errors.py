"""Exceptions raised by probdeblend.

Every error names the offending argument and says how to fix the input, in the spirit of
GalSim's ``galsim.errors``. All inherit from :class:`ProbdeblendError`, so ``except
ProbdeblendError`` catches anything the library raises on purpose. Input errors also inherit from
``ValueError`` (or ``TypeError`` for wrong types) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ProbdeblendError",
    "SceneError",
    "InvalidImageError",
    "InvalidVarianceError",
    "InvalidPSFError",
    "BandMismatchError",
    "PositionError",
    "InvalidDtypeError",
    "UnknownSurveyError",
    "UnknownBandError",
    "PriorLoadError",
    "ChecksumMismatchError",
    "DatasetError",
]


class ProbdeblendError(Exception):
    """Base class of every exception raised on purpose by probdeblend."""


class SceneError(ProbdeblendError, ValueError):
    """A :class:`probdeblend.Scene` was built from invalid input.

    Attributes
    ----------
    argument : str
        Name of the constructor argument at fault (``"image"``, ``"variance"``, ``"psf"``, ...).
    """

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class InvalidImageError(SceneError):
    """The image cube is empty, too small, of the wrong rank, or holds NaN/inf pixels."""


class InvalidVarianceError(SceneError):
    """The variance is negative, zero, NaN/inf where the pixel is not masked, or misshaped."""


class InvalidPSFError(SceneError):
    """A PSF image is misshaped, even-sized, not normalised to unit sum, or not finite."""


class BandMismatchError(SceneError):
    """Band names and the image / variance / PSF band axes do not agree."""


class PositionError(SceneError):
    """Source positions are misshaped or fall outside the image."""


class InvalidDtypeError(SceneError, TypeError):
    """An array has a dtype that cannot hold image data (complex, integer overflowing, object)."""


class UnknownSurveyError(ProbdeblendError, KeyError):
    """A survey name is not known to probdeblend / surveycodex."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class UnknownBandError(ProbdeblendError, KeyError):
    """A band name is not part of the survey or the prior's model frame."""

    def __str__(self) -> str:
        return str(self.args[0])


class PriorLoadError(ProbdeblendError, ValueError):
    """A shipped or user-given prior could not be loaded (missing file, bad card, wrong bands)."""


class ChecksumMismatchError(PriorLoadError):
    """The sha256 of a weight file differs from the one recorded in its model card."""


class DatasetError(ProbdeblendError, ValueError):
    """A simulated dataset on disk is missing, incomplete or inconsistent."""
