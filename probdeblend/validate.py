"""Up-front argument checks that raise the :mod:`probdeblend.errors` family.

Call these at the top of a public function, before any heavy work, so that a bad argument fails
in milliseconds with a message that names the argument, shows the value and says how to fix it::

    from probdeblend.validate import check_int, check_seed, check_choice

    def fit(scene, *, num_samples=1000, seed=0, method="auto"):
        num_samples = check_int("num_samples", num_samples, minimum=1)
        seed = check_seed("seed", seed)
        method = check_choice("method", method, ("auto", "amortized", "svi", "nuts"))

Every helper returns the normalised value (a Python ``int`` / ``float`` / ``str`` / ``bool``)
and raises :class:`~probdeblend.errors.ArgumentTypeError` (a ``TypeError``) for a value of the
wrong type or :class:`~probdeblend.errors.ArgumentError` (a ``ValueError``) for a value out of
range. Both carry ``.argument`` and ``.value``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, InputNotFoundError, OutputExistsError

__all__ = [
    "check_int",
    "check_float",
    "check_seed",
    "check_choice",
    "check_bool",
    "check_input_path",
    "check_output_path",
    "check_distinct_paths",
    "MAX_SEED",
]

#: Largest accepted seed (seeds feed numpy, JAX and torch generators: non-negative, < 2**63).
MAX_SEED = 2**63 - 1


def _type_name(value: Any) -> str:
    return type(value).__name__


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def check_int(name: str, value: Any, minimum: int | None = None,
              maximum: int | None = None, *, allow_none: bool = False) -> int | None:
    """Check that ``value`` is an integer in ``[minimum, maximum]`` and return it as ``int``.

    Accepts Python and numpy integers. Floats (even ``2.0``), strings and booleans are refused,
    so that ``num_samples=2.7`` or ``True`` is caught rather than silently truncated.

    Parameters
    ----------
    name : str
        Argument name used in the message (``"num_samples"``, ``"--num-samples"``).
    value : object
        The value to check.
    minimum, maximum : int, optional
        Inclusive bounds.
    allow_none : bool, default False
        Accept ``None`` (returned unchanged).

    Returns
    -------
    int or None

    Raises
    ------
    ArgumentTypeError
        ``value`` is not an integer (float, bool, str, array...).
    ArgumentError
        ``value`` is outside ``[minimum, maximum]``.

    Examples
    --------
    >>> check_int("num_samples", 1000, minimum=1)
    1000
    """
    if value is None and allow_none:
        return None
    rng = _range_text(minimum, maximum)
    want = f"an integer {rng}".rstrip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            if math.isfinite(float(value)):
                hint = f"; round it explicitly, e.g. {name}={round(float(value))}"
        raise ArgumentTypeError(
            name, value, f"must be {want}, got {value!r} ({_type_name(value)}){hint}"
        )
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ArgumentError(name, value, f"must be {want}, got {v}")
    return v


def check_float(name: str, value: Any, minimum: float | None = None,
                maximum: float | None = None, *, exclusive_minimum: bool = False,
                allow_none: bool = False) -> float | None:
    """Check that ``value`` is a finite real number in range and return it as ``float``.

    Parameters
    ----------
    name : str
        Argument name used in the message.
    value : object
        The value to check: a Python / numpy real number (integers accepted). Booleans, strings,
        arrays and NaN / inf are refused.
    minimum, maximum : float, optional
        Bounds (``maximum`` inclusive).
    exclusive_minimum : bool, default False
        Require ``value > minimum`` instead of ``>=`` (e.g. a step size that must be positive).
    allow_none : bool, default False
        Accept ``None`` (returned unchanged).

    Returns
    -------
    float or None

    Raises
    ------
    ArgumentTypeError
        Not a real number.
    ArgumentError
        NaN, infinite or out of range.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            name, value, f"must be a real number, got {value!r} ({_type_name(value)})"
        )
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(name, value, f"must be finite, got {v}")
    low_bad = minimum is not None and (v <= minimum if exclusive_minimum else v < minimum)
    if low_bad or (maximum is not None and v > maximum):
        lo = None if minimum is None else (f"> {minimum}" if exclusive_minimum else f">= {minimum}")
        parts = [p for p in (lo, None if maximum is None else f"<= {maximum}") if p]
        raise ArgumentError(name, value, f"must be {' and '.join(parts)}, got {v:g}")
    return v


def check_seed(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """Check a random seed: a non-negative integer below ``2**63``.

    Parameters
    ----------
    name : str
        Argument name (usually ``"seed"``).
    value : object
    allow_none : bool, default False
        Accept ``None`` (meaning "fresh entropy"), returned unchanged.

    Returns
    -------
    int or None

    Raises
    ------
    ArgumentTypeError
        Not an integer.
    ArgumentError
        Negative or ``>= 2**63``.
    """
    if value is None and allow_none:
        return None
    try:
        return check_int(name, value, minimum=0, maximum=MAX_SEED)
    except ArgumentTypeError:
        raise
    except ArgumentError:
        raise ArgumentError(
            name, value,
            f"must be a non-negative integer below 2**63, got {value!r}; seeds feed numpy, JAX "
            "and torch generators, which need non-negative seeds (e.g. seed=0)",
        ) from None


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices`` and return it.

    Parameters
    ----------
    name : str
        Argument name used in the message.
    value : object
    choices : iterable
        The allowed values (compared with ``==``; strings are case-sensitive).

    Returns
    -------
    object
        ``value``.

    Raises
    ------
    ArgumentError
        ``value`` is not one of ``choices`` (the message lists them, and names a close match
        when the value differs only in case).
    """
    options = list(choices)
    try:
        ok = value in options
    except TypeError:  # unhashable / uncomparable
        ok = False
    if ok:
        return value
    hint = ""
    if isinstance(value, str):
        near = [c for c in options if isinstance(c, str) and c.lower() == value.strip().lower()]
        if near:
            hint = f"; did you mean {near[0]!r}?"
    raise ArgumentError(
        name, value, f"must be one of {options}, got {value!r}{hint}"
    )


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (Python or numpy) and return it.

    Raises
    ------
    ArgumentTypeError
        Anything else (``0``, ``"yes"``, ``None``).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(name, value, f"must be True or False, got {value!r}")


def check_input_path(name: str, value: Any, *, directory: bool = False) -> Path:
    """Check that an input path exists (a file, or a folder when ``directory``) and return it.

    Raises
    ------
    ArgumentTypeError
        ``value`` is not a str / os.PathLike.
    InputNotFoundError
        Nothing exists at the path (or it is a folder where a file is wanted, or vice versa).
    """
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise ArgumentTypeError(name, value, f"must be a path (str or os.PathLike), got "
                                             f"{value!r} ({_type_name(value)})")
    p = Path(value).expanduser()
    if not p.exists():
        raise InputNotFoundError(p, f"{name}: {str(p)!r} does not exist; check the path",
                                 argument=name)
    if directory and not p.is_dir():
        raise InputNotFoundError(p, f"{name}: {str(p)!r} is not a folder", argument=name)
    if not directory and p.is_dir():
        raise InputNotFoundError(p, f"{name}: {str(p)!r} is a folder, expected a file",
                                 argument=name)
    return p


def check_output_path(name: str, value: Any, *, overwrite: bool = False) -> Path:
    """Check an output path before any work starts: a path, not a folder, free or overwritable.

    Parameters
    ----------
    name : str
        Argument name (``"out"``, ``"--out"``).
    value : str or os.PathLike
    overwrite : bool, default False
        Whether an existing file may be replaced.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ArgumentTypeError
        Not a str / os.PathLike.
    ArgumentError
        The path is an existing folder.
    OutputExistsError
        A file exists there and ``overwrite`` is False.
    """
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes) or value == "":
        raise ArgumentTypeError(name, value, f"must be a non-empty path, got {value!r}")
    p = Path(value).expanduser()
    if p.is_dir():
        raise ArgumentError(name, str(p), f"{str(p)!r} is a folder; give a file name inside it")
    if p.exists() and not overwrite:
        raise OutputExistsError(
            p, f"{name}: {str(p)!r} already exists; pass overwrite=True (--overwrite) to replace "
               "it or choose another path", argument=name,
        )
    return p


def check_distinct_paths(paths: dict[str, Any]) -> None:
    """Check that output products go to distinct files.

    Parameters
    ----------
    paths : dict
        ``{argument_or_product_name: path}``; ``None`` values are skipped.

    Raises
    ------
    ArgumentError
        Two products resolve to the same file (``argument`` names the second one).
    """
    seen: dict[str, str] = {}
    for name, value in paths.items():
        if value is None:
            continue
        key = os.path.normcase(os.path.abspath(os.fspath(Path(value).expanduser())))
        if key in seen:
            raise ArgumentError(
                name, str(value),
                f"{str(value)!r} is also the {seen[key]} output; each product needs its own "
                "file: choose different paths",
            )
        seen[key] = name
