"""Exceptions and warnings raised by probdeblend.

Every error names the offending argument and says how to fix the input, in the spirit of
GalSim's ``galsim.errors``.

* Every exception the package raises on purpose derives from :class:`ProbdeblendError`, so
  ``except ProbdeblendError`` catches all of them, **and** from the matching builtin
  (``ValueError``, ``TypeError``, ``KeyError``, ``FileNotFoundError``, ``FileExistsError``,
  ``RuntimeError``), so generic handlers keep working.
* Each carries ``argument`` (the name of the argument at fault, or ``None``) and ``value`` (the
  offending value, or :data:`NO_VALUE` when there is none worth keeping, e.g. a whole image).
* Each pickles and unpickles with its arguments and attributes intact (multiprocessing, Dask and
  joblib workers send exceptions back to the parent by pickling them).
* Every warning derives from :class:`ProbdeblendWarning` (a ``UserWarning``), so
  ``warnings.simplefilter("ignore", ProbdeblendWarning)`` silences the library's own warnings.

Hierarchy::

    ProbdeblendError
    +-- ArgumentError (ValueError)                  argument, value, message
    |   +-- ArgumentTypeError (TypeError)
    |   +-- SceneError                              argument, message
    |       +-- InvalidImageError, InvalidVarianceError, InvalidPSFError
    |       +-- BandMismatchError, PositionError
    |       +-- InvalidDtypeError (TypeError)
    +-- UnknownSurveyError (KeyError)               message
    +-- UnknownBandError (KeyError)                 message
    +-- PriorLoadError (ValueError)                 message
    |   +-- ChecksumMismatchError
    |   +-- NotAPriorError
    +-- DatasetError (ValueError)                   message
    +-- InputNotFoundError (FileNotFoundError)      path, message
    +-- OutputExistsError (FileExistsError)         path, message
    +-- CorruptFileError (ValueError)               path, message, hdu
    |   +-- FITSChecksumError
    +-- InferenceError (RuntimeError)               message
        +-- BudgetExceededError                     message, projected_s, elapsed_s

    ProbdeblendWarning (UserWarning)
    +-- MeasurementWarning (RuntimeWarning)
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "NO_VALUE",
    "ProbdeblendError",
    "ArgumentError",
    "ArgumentTypeError",
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
    "NotAPriorError",
    "DatasetError",
    "InputNotFoundError",
    "OutputExistsError",
    "CorruptFileError",
    "FITSChecksumError",
    "InferenceError",
    "BudgetExceededError",
    "ProbdeblendWarning",
    "MeasurementWarning",
    "all_error_classes",
]


class _NoValue:
    """Marker for "no offending value recorded" (distinct from ``None``, a valid bad value)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __reduce__(self):
        return (_NoValue, ())

    def __bool__(self) -> bool:
        return False


#: Value of :attr:`ProbdeblendError.value` when no offending value is recorded.
NO_VALUE: Any = _NoValue()


def _restore(cls, args, state):
    """Unpickle a :class:`ProbdeblendError` without calling its ``__init__``."""
    obj = cls.__new__(cls, *args)
    obj.args = args
    obj.__dict__.update(state)
    return obj


def _picklable(value: Any) -> Any:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any failure means "send its repr instead"
        return repr(value)
    return value


class ProbdeblendError(Exception):
    """Base class of every exception raised on purpose by probdeblend.

    Parameters
    ----------
    message : str
        What went wrong and how to fix it.
    argument : str, optional
        Name of the argument at fault.
    value : object, optional
        The offending value.

    Attributes
    ----------
    message : str
    argument : str or None
    value : object
        :data:`NO_VALUE` when none was recorded.
    """

    argument: str | None = None
    value: Any = NO_VALUE

    def __init__(self, message: str = "", *, argument: str | None = None,
                 value: Any = NO_VALUE) -> None:
        self._set(str(message), argument, value)
        super().__init__(self.message)

    def _set(self, message: str, argument: str | None, value: Any) -> None:
        self.message = message
        self.argument = argument
        self.value = value

    def __str__(self) -> str:  # KeyError / OSError would otherwise quote or decorate it
        return self.message

    def __reduce__(self):
        state = dict(self.__dict__)
        if "value" in state:
            state["value"] = _picklable(state["value"])
        return (_restore, (type(self), tuple(self.args), state))


# -- arguments -------------------------------------------------------------------------------
class ArgumentError(ProbdeblendError, ValueError):
    """An argument has an invalid value.

    Parameters
    ----------
    argument : str
        Name of the argument (``"num_samples"``, ``"--seed"``...).
    value : object
        The offending value.
    message : str
        What is wrong and how to fix it. The string form is ``f"{argument}: {message}"``, or
        ``message`` alone when it already starts with the argument name
        (``"fwhm must be positive"``).
    """

    def __init__(self, argument: str, value: Any, message: str) -> None:
        message = str(message)
        named = message.startswith((f"{argument} ", f"{argument}:", f"{argument}="))
        self._set(message if named else f"{argument}: {message}", argument, value)
        Exception.__init__(self, self.message)


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has the wrong type (e.g. a float where an integer is required)."""


class SceneError(ArgumentError):
    """A :class:`probdeblend.Scene` was built from invalid input.

    Parameters
    ----------
    argument : str
        Name of the constructor argument at fault (``"image"``, ``"variance"``, ``"psf"``, ...).
    message : str
        What is wrong and how to fix it; the string form is ``f"{argument}: {message}"``.
    value : object, optional
        The offending value when small enough to be worth keeping (not whole images).
    """

    def __init__(self, argument: str, message: str, value: Any = NO_VALUE) -> None:
        self._set(f"{argument}: {message}", argument, value)
        Exception.__init__(self, self.message)


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


# -- names -------------------------------------------------------------------------------------
class UnknownSurveyError(ProbdeblendError, KeyError):
    """A survey name is not known to probdeblend / surveycodex."""


class UnknownBandError(ProbdeblendError, KeyError):
    """A band name is not part of the survey or the prior's model frame."""


# -- models and data ---------------------------------------------------------------------------
class PriorLoadError(ProbdeblendError, ValueError):
    """A shipped or user-given prior could not be loaded (missing file, bad card, wrong bands)."""


class ChecksumMismatchError(PriorLoadError):
    """The sha256 of a weight file differs from the one recorded in its model card."""


class NotAPriorError(PriorLoadError):
    """The name or path given as a prior is another kind of model (e.g. an amortized encoder)."""


class DatasetError(ProbdeblendError, ValueError):
    """A simulated dataset on disk is missing, incomplete or inconsistent."""


# -- files -------------------------------------------------------------------------------------
class _PathError(ProbdeblendError):
    def __init__(self, path: Any, message: str | None = None, *, argument: str = "path") -> None:
        path_s = str(path)
        if message is None:
            message = f"{argument}: {self._default(path_s)}"
        self._set(message, argument, path_s)
        self.path = path_s
        self.filename = path_s  # the OSError attribute
        Exception.__init__(self, self.message)

    @staticmethod
    def _default(path: str) -> str:  # pragma: no cover - overridden
        return path


class InputNotFoundError(_PathError, FileNotFoundError):
    """An input file or folder does not exist.

    Parameters
    ----------
    path : str or os.PathLike
    message : str, optional
    argument : str, default "path"
    """

    @staticmethod
    def _default(path: str) -> str:
        return f"{path!r} does not exist; check the path"


class OutputExistsError(_PathError, FileExistsError):
    """An output file exists and overwriting was not asked for.

    Parameters
    ----------
    path : str or os.PathLike
    message : str, optional
        Default: ``"<argument>: '<path>' already exists; pass overwrite=True (--overwrite) to
        replace it or choose another path"``.
    argument : str, default "path"
    """

    @staticmethod
    def _default(path: str) -> str:
        return (f"{path!r} already exists; pass overwrite=True (--overwrite) to replace it or "
                "choose another path")


class CorruptFileError(ProbdeblendError, ValueError):
    """An input file is truncated, damaged or not of the expected format.

    Parameters
    ----------
    path : str or os.PathLike
    message : str
    hdu : str, optional
        The FITS HDU at fault, when known.
    argument : str, default "path"
    """

    def __init__(self, path: Any, message: str, hdu: str | None = None, *,
                 argument: str = "path") -> None:
        path_s = str(path)
        self._set(message, argument, path_s)
        self.path = path_s
        self.hdu = hdu
        Exception.__init__(self, self.message)


class FITSChecksumError(CorruptFileError):
    """A FITS HDU's CHECKSUM or DATASUM keyword does not match its content (``hdu`` names it)."""


# -- inference -----------------------------------------------------------------------------------
class InferenceError(ProbdeblendError, RuntimeError):
    """Inference could not produce a usable posterior (e.g. every draw failed)."""


class BudgetExceededError(InferenceError):
    """A sampler stopped because its projected run time exceeded the time budget it was
    given (``argument`` names the budget; ``projected_s`` and ``elapsed_s`` in seconds)."""

    def __init__(self, message: str, *, argument: str | None = None,
                 projected_s: float = float("nan"), elapsed_s: float = float("nan")) -> None:
        super().__init__(message, argument=argument)
        self.projected_s, self.elapsed_s = float(projected_s), float(elapsed_s)


# -- warnings --------------------------------------------------------------------------------------
class ProbdeblendWarning(UserWarning):
    """Base class of every warning issued by probdeblend."""


class MeasurementWarning(ProbdeblendWarning, RuntimeWarning):
    """A measurement (moments, radius, shape) failed or did not converge for some images."""


def all_error_classes() -> list[type[ProbdeblendError]]:
    """Every :class:`ProbdeblendError` subclass defined in this module (for tests and docs)."""
    out: list[type[ProbdeblendError]] = []
    todo = [ProbdeblendError]
    while todo:
        cls = todo.pop(0)
        if not cls.__name__.startswith("_") and cls not in out:
            out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if c.__module__ == __name__]
