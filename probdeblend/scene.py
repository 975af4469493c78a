"""The observation a user hands to probdeblend: :class:`Scene`.

A :class:`Scene` is one multi-band image of a patch of sky together with everything needed to
model it: the per-pixel noise variance, one PSF image per band, the band names, the pixel scale,
and optionally a WCS and known source positions. It is validated once, on construction, and is
immutable afterwards (GalSim style): methods such as :meth:`Scene.with_positions` and
:meth:`Scene.select_bands` return new scenes.

Conventions
-----------
Arrays
    ``image`` and ``variance`` are cubes of shape ``(n_band, ny, nx)``; ``psf`` is
    ``(n_band, k, k)`` with ``k`` odd. All three are stored as read-only ``float32`` arrays.
Units
    ``image`` is flux per pixel in ``units`` (default ``"electron"``; ``"nJy"`` is the other
    common choice), ``variance`` is in ``units**2``, ``pixel_scale`` in arcsec / pixel.
Masking
    A pixel is masked when its variance is ``np.inf`` (equivalently, inverse variance 0). Masked
    pixels carry no information: their image value is stored as ``0.0`` and their weight is 0.
Pixel coordinates
    0-based, pixel-centre convention: the centre of pixel ``image[b, j, i]`` is ``(x=i, y=j)``, so
    the image covers ``-0.5 <= x < nx - 0.5`` and ``-0.5 <= y < ny - 0.5``. This is numpy's
    and astropy's convention (``WCS.pixel_to_world`` / ``world_to_pixel``). FITS headers, DS9 and
    SExtractor catalogues are 1-based: ``x_fits = x + 1``, ``y_fits = y + 1``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .atomic import write_fits
from .errors import (
    BandMismatchError,
    CorruptFileError,
    FITSChecksumError,
    InputNotFoundError,
    InvalidDtypeError,
    InvalidImageError,
    InvalidPSFError,
    InvalidVarianceError,
    PositionError,
    SceneError,
    UnknownBandError,
)

__all__ = ["Scene", "MIN_IMAGE_SIZE", "PSF_SUM_RTOL", "MIN_PSF_FLUX_FRACTION",
           "FITS_FORMAT_VERSION"]

#: Smallest accepted image side, in pixels.
MIN_IMAGE_SIZE = 16
#: Relative tolerance on the unit sum of each band's PSF image.
PSF_SUM_RTOL = 1e-3
#: Smallest accepted ``psf_flux_fraction``: a PSF image holding less than half of a star's
#: light is a mistake (a wrong normalisation or a far too small image), not an aperture
#: correction.
MIN_PSF_FLUX_FRACTION = 0.5
#: Value of the ``PBVERSN`` primary-header key written by :meth:`Scene.to_fits` (FITS keywords
#: are at most 8 characters, so not ``PBVERSION``; a ``HIERARCH PBVERSION`` card is also read).
FITS_FORMAT_VERSION = "1"

_ACCEPTED_KINDS = "fiu"  # floating point, signed and unsigned integers
_ACCEPTED_DTYPES_TEXT = "real floating point or integer (stored as float32)"
_F32_MAX = float(np.finfo(np.float32).max)
#: Smallest variance whose inverse is finite in float32.
_MIN_VARIANCE = 1.0 / _F32_MAX
_MAX_LISTED = 10  # offending source indices listed in a message
_WCS_KEYS = ("CTYPE1", "CRVAL1", "CRPIX1", "CD1_1", "PC1_1", "CDELT1")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _as_real_array(value: Any, argument: str) -> np.ndarray:
    """``np.asarray(value)`` that accepts only real floating-point or integer dtypes."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested sequences
        raise InvalidDtypeError(
            argument,
            f"could not be converted to a numeric array ({exc}); pass a regular "
            f"{_ACCEPTED_DTYPES_TEXT} numpy array",
        ) from None
    if arr.dtype.kind not in _ACCEPTED_KINDS:
        what = "None" if value is None else f"dtype {arr.dtype}"
        hint = ""
        if arr.dtype.kind == "c":
            hint = "; take .real or np.abs() explicitly if that is what you mean"
        elif arr.dtype.kind == "b":
            hint = "; a boolean mask belongs in the variance (np.inf = masked), not in " + argument
        raise InvalidDtypeError(
            argument, f"got {what}; accepted dtypes are {_ACCEPTED_DTYPES_TEXT}{hint}"
        )
    return arr


def _to_float32(arr: np.ndarray, argument: str, error: type[SceneError]) -> np.ndarray:
    """Copy ``arr`` to native float32, refusing finite values that overflow float32."""
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32, copy=True)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        overflow = np.isfinite(arr) & ~np.isfinite(out)
        if overflow.any():
            idx = _first_index(overflow)
            raise error(
                argument,
                f"{int(overflow.sum())} finite value(s) exceed the float32 range "
                f"(|x| > {_F32_MAX:.3g}), first at index {idx} = {arr[idx]!r}; rescale the "
                "data to other units",
            )
    return out


def _split_masked(value: Any) -> tuple[Any, np.ndarray | None]:
    """Return (data, mask) for a numpy masked array, (value, None) otherwise."""
    if isinstance(value, np.ma.MaskedArray):
        return value.data, np.ma.getmaskarray(value)
    return value, None


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    """Index tuple of the first ``True`` element of a boolean array (which has one)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def _freeze(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _validate_bands(bands: Any) -> tuple[str, ...]:
    if isinstance(bands, str):
        bands = [bands]
    try:
        names = tuple(bands)
    except TypeError:
        raise SceneError(
            "bands", f"expected a sequence of band names such as ['g', 'r', 'i'], got {bands!r}",
            value=bands,
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise SceneError(
                "bands", f"band names must be strings, got {name!r} ({type(name).__name__})",
                value=name,
            )
        if (
            not name
            or name != name.strip()
            or "," in name
            or not (name.isascii() and name.isprintable())
        ):
            raise SceneError(
                "bands",
                f"invalid band name {name!r}: names must be non-empty printable ASCII without "
                "commas or surrounding whitespace (they are stored comma-joined in FITS headers)",
                value=name,
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BandMismatchError(
            "bands",
            f"band names must be unique, {dupes} appear more than once in "
            f"{list(names)}; give each image plane its own name",
        )
    return names


def _validate_pixel_scale(pixel_scale: Any) -> float:
    bad = isinstance(pixel_scale, (bool, np.bool_, str, bytes)) or np.ndim(pixel_scale) != 0
    value = math.nan
    if not bad:
        try:
            value = float(pixel_scale)
        except (TypeError, ValueError):
            bad = True
    if bad or not math.isfinite(value) or value <= 0:
        raise SceneError(
            "pixel_scale",
            f"must be a positive finite float in arcsec/pixel (e.g. 0.2 for LSST), got "
            f"{pixel_scale!r}; for an astropy Quantity pass q.to_value('arcsec')",
            value=pixel_scale,
        )
    return value


def _validate_units(units: Any) -> str:
    if not isinstance(units, str) or not units.strip() or not units.isascii():
        raise SceneError(
            "units",
            f"must be a non-empty ASCII string naming the flux unit per pixel such as "
            f"'electron' or 'nJy', got {units!r}",
            value=units,
        )
    return units.strip()


def _validate_wcs(wcs: Any) -> WCS | None:
    if wcs is None:
        return None
    if not isinstance(wcs, WCS):
        raise SceneError(
            "wcs",
            f"expected an astropy.wcs.WCS or None, got {type(wcs).__name__}; build one with "
            "astropy.wcs.WCS(header)",
        )
    if wcs.naxis != 2:
        raise SceneError(
            "wcs",
            f"expected a 2-axis (x, y) celestial WCS, got naxis={wcs.naxis}; pass wcs.celestial",
        )
    return wcs.deepcopy()


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------
class Scene:
    """One multi-band observation: pixels, noise, PSFs, bands, pixel scale.

    A Scene is validated on construction and immutable afterwards; methods return new Scenes.
    Every validation failure raises a subclass of :class:`~probdeblend.errors.SceneError` whose
    ``argument`` attribute names the offending argument and whose message says how to fix it.

    Parameters
    ----------
    image : array_like, shape (n_band, ny, nx)
        Background-subtracted flux per pixel, in ``units``. A 2-D ``(ny, nx)`` array is accepted
        when ``bands`` has a single name. Real floating-point or integer dtypes; stored as
        float32. NaN/inf are allowed only in masked pixels. ``ny, nx >= 16``. A
        :class:`numpy.ma.MaskedArray` is accepted and its masked pixels are masked.
    variance : array_like or float, shape (n_band, ny, nx)
        Per-pixel noise variance in ``units**2``; must be ``> 0``. ``np.inf`` masks a pixel (zero
        weight). A scalar applies to every pixel. See also :meth:`from_inverse_variance`.
    psf : array_like, shape (n_band, k, k)
        One PSF image per band, sampled on the image's pixel grid: ``k`` odd, ``k >= 3``, peak on
        (within one pixel of) the middle pixel ``(k // 2, k // 2)``, finite, summing to 1 within
        ``PSF_SUM_RTOL``. A 2-D ``(k, k)`` array is accepted for a single band.
    bands : sequence of str
        Band names, one per image plane, unique (``["g", "r", "i"]``). A single string is one
        band name.
    pixel_scale : float
        Pixel scale in arcsec / pixel.
    positions : array_like, shape (n_source, 2), optional
        Known source positions as ``(x, y)`` in 0-based pixel coordinates (see Notes); ``None``
        (default) means unknown, to be detected. Every position must lie on the image.
    wcs : astropy.wcs.WCS, optional
        2-axis celestial WCS of the image plane. A copy is stored.
    units : str, default "electron"
        Unit of ``image`` (flux per pixel), e.g. ``"electron"`` or ``"nJy"``.
    psf_flux_fraction : float or array_like, shape (n_band,), optional
        Per band, the fraction of a point source's total flux that falls inside its PSF image
        (the *aperture correction* of the PSF image, in ``[MIN_PSF_FLUX_FRACTION, 1]``):
        ``psf`` is unit-sum, but a real PSF has wings beyond any image of it (a Kolmogorov
        PSF of FWHM 1" keeps ~0.75 % of its light outside 41 x 41 px at 0.2"/px), light the
        data hold at surface brightnesses far below the noise and a model with the unit-sum
        PSF cannot see, so every fitted flux would be low by that fraction. With it, the
        forward model renders a source of total flux ``f`` as ``f * psf_flux_fraction *
        (galaxy * psf)`` and every reported flux is a *total* flux. ``None`` (default):
        1 in every band (the PSF image holds all the light). Surveys measure it from bright
        stars (e.g. the LSST pipelines' aperture corrections); the simulators set it from
        their GalSim PSFs.

    Attributes
    ----------
    image, variance, psf : numpy.ndarray
        Read-only float32 arrays as described above (masked image pixels are 0).
    bands : tuple of str
    pixel_scale : float
    positions : numpy.ndarray or None
        Read-only float64 array of shape (n_source, 2).
    units : str
    psf_flux_fraction : numpy.ndarray
        Read-only float64 array of shape (n_band,) (ones when not given).

    Raises
    ------
    InvalidDtypeError
        An array has a complex, boolean, string or object dtype.
    InvalidImageError
        Image empty, too small, of wrong rank, fully masked, or NaN/inf in unmasked pixels.
    InvalidVarianceError
        Variance zero, negative, NaN, too small for float32, or misshaped.
    InvalidPSFError
        PSF even-sized, non-square, too small/large, not finite, not normalised, off-centre;
        ``psf_flux_fraction`` not finite, misshaped or outside ``[MIN_PSF_FLUX_FRACTION, 1]``.
    BandMismatchError
        Band names duplicated or not matching the band axis of image / variance / PSF.
    PositionError
        Positions misshaped, not finite, or off the image.
    SceneError
        Bad ``bands`` type, ``pixel_scale``, ``wcs`` or ``units``.

    Notes
    -----
    **Pixel coordinates.** Positions use the 0-based pixel-centre convention of numpy and
    astropy: the centre of pixel ``image[b, j, i]`` is ``(x=i, y=j)``, so the image covers
    ``-0.5 <= x < nx - 0.5`` and ``-0.5 <= y < ny - 0.5``. FITS, DS9 and SExtractor use 1-based
    coordinates: ``x_fits = x + 1``, ``y_fits = y + 1``. ``scene.wcs.pixel_to_world(x, y)`` takes
    the 0-based values directly.

    **Masking.** A pixel is masked in one band when its variance is ``np.inf``; its stored image
    value is 0 and its weight 0. Masked pixels may hold NaN/inf in the input image.

    Examples
    --------
    >>> import numpy as np, galsim
    >>> psf = galsim.Gaussian(fwhm=0.8).drawImage(nx=25, ny=25, scale=0.2).array
    >>> psf = np.stack([psf / psf.sum()] * 2)
    >>> image = np.zeros((2, 32, 32))
    >>> scene = Scene(image, np.full_like(image, 4.0), psf, ["g", "r"], pixel_scale=0.2)
    >>> scene.shape, scene.n_bands
    ((32, 32), 2)
    """

    image: np.ndarray
    variance: np.ndarray
    psf: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    positions: np.ndarray | None
    units: str
    psf_flux_fraction: np.ndarray

    def __init__(
        self,
        image: Any,
        variance: Any,
        psf: Any,
        bands: Sequence[str] | str,
        pixel_scale: float,
        positions: Any = None,
        wcs: WCS | None = None,
        units: str = "electron",
        psf_flux_fraction: Any = None,
    ) -> None:
        names = _validate_bands(bands)
        units = _validate_units(units)
        pixel_scale = _validate_pixel_scale(pixel_scale)
        wcs = _validate_wcs(wcs)

        # -- image: dtype, rank, band count, size ----------------------------------------------
        image, image_mask = _split_masked(image)
        img_in = _as_real_array(image, "image")
        if img_in.ndim == 2:
            if len(names) != 1:
                raise BandMismatchError(
                    "bands",
                    f"image is 2-D (a single band) but bands has {len(names)} names "
                    f"{list(names)}; pass an image cube of shape ({len(names)}, ny, nx)",
                )
            img_in = img_in[np.newaxis]
            image_mask = None if image_mask is None else image_mask[np.newaxis]
        elif img_in.ndim != 3:
            raise InvalidImageError(
                "image",
                f"expected shape (n_band, ny, nx) (or (ny, nx) for one band), got "
                f"{img_in.ndim}-D shape {img_in.shape}",
            )
        if img_in.size == 0:
            raise InvalidImageError("image", f"is empty (shape {img_in.shape})")
        n_band, ny, nx = img_in.shape
        if n_band != len(names):
            raise BandMismatchError(
                "bands",
                f"image has {n_band} band plane(s) (axis 0 of shape {img_in.shape}) but bands "
                f"has {len(names)} name(s) {list(names)}; give exactly one name per plane",
            )
        if ny < MIN_IMAGE_SIZE or nx < MIN_IMAGE_SIZE:
            raise InvalidImageError(
                "image",
                f"is {ny}x{nx} pixels (ny x nx), too small; probdeblend needs at least "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels: cut out a larger stamp",
            )

        # -- variance ------------------------------------------------------------------------
        var = self._check_variance(variance, img_in.shape)
        if image_mask is not None:
            var[image_mask] = np.inf
        mask = np.isinf(var)

        # -- image values ----------------------------------------------------------------------
        img = _to_float32(img_in, "image", InvalidImageError)
        bad = ~np.isfinite(img) & ~mask
        if bad.any():
            idx = _first_index(bad)
            raise InvalidImageError(
                "image",
                f"{int(bad.sum())} unmasked pixel(s) are NaN or inf, first at (band, y, x) = "
                f"{idx} with value {img[idx]}; mask them with variance=np.inf or use "
                "Scene.from_inverse_variance with weight 0",
            )
        if mask.all():
            raise InvalidImageError(
                "image",
                "every pixel is masked (variance is np.inf everywhere); there is nothing to fit: "
                "check the variance / weight map",
            )
        img[mask] = 0.0

        # -- PSF -------------------------------------------------------------------------------
        psf_arr = self._check_psf(psf, names, (ny, nx))
        psf_frac = self._check_psf_flux_fraction(psf_flux_fraction, names)

        # -- positions -------------------------------------------------------------------------
        pos = self._check_positions(positions, (ny, nx))

        set_ = object.__setattr__
        set_(self, "image", _freeze(img))
        set_(self, "variance", _freeze(var))
        set_(self, "psf", _freeze(psf_arr))
        set_(self, "bands", names)
        set_(self, "pixel_scale", pixel_scale)
        set_(self, "positions", pos)
        set_(self, "units", units)
        set_(self, "psf_flux_fraction", _freeze(psf_frac))
        set_(self, "_wcs", wcs)
        set_(self, "mask", _freeze(mask))

    # ---------------------------------------------------------------------------------------
    # validation of the individual arrays
    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _check_variance(variance: Any, shape: tuple[int, int, int]) -> np.ndarray:
        variance, var_mask = _split_masked(variance)
        var_in = _as_real_array(variance, "variance")
        if var_in.ndim == 2 and shape[0] == 1:
            var_in = var_in[np.newaxis]
            var_mask = None if var_mask is None else var_mask[np.newaxis]
        if var_in.ndim == 0:
            var_in = np.broadcast_to(var_in, shape)
        elif var_in.shape != shape:
            raise InvalidVarianceError(
                "variance",
                f"has shape {var_in.shape} but image has shape {shape}; pass one variance per "
                "pixel (same shape as image) or a single float",
            )
        var = _to_float32(var_in, "variance", InvalidVarianceError)
        if var_mask is not None:
            var[var_mask] = np.inf
        with np.errstate(invalid="ignore"):
            n_nan = np.isnan(var)
            n_neg = var < 0
            n_zero = var == 0
            n_tiny = (var > 0) & (var < _MIN_VARIANCE)
        bad = n_nan | n_neg | n_zero
        if bad.any():
            idx = _first_index(bad)
            raise InvalidVarianceError(
                "variance",
                f"must be > 0 in every unmasked pixel; {int(bad.sum())} pixel(s) are zero, "
                f"negative or NaN ({int(n_zero.sum())} zero, {int(n_neg.sum())} negative, "
                f"{int(n_nan.sum())} NaN), first at (band, y, x) = {idx} with value {var[idx]}; "
                "use np.inf to mask a pixel (or weight 0 with Scene.from_inverse_variance)",
            )
        if n_tiny.any():
            idx = _first_index(n_tiny)
            raise InvalidVarianceError(
                "variance",
                f"{int(n_tiny.sum())} pixel(s) have variance below {_MIN_VARIANCE:.3g}, whose "
                f"inverse overflows float32, first at (band, y, x) = {idx}; rescale the image "
                "to larger units",
            )
        return var

    @staticmethod
    def _check_psf(psf: Any, names: tuple[str, ...], image_shape: tuple[int, int]) -> np.ndarray:
        psf_in = _as_real_array(psf, "psf")
        if psf_in.ndim == 2 and len(names) == 1:
            psf_in = psf_in[np.newaxis]
        if psf_in.ndim != 3:
            raise InvalidPSFError(
                "psf",
                f"expected shape (n_band, k, k) with one PSF image per band, got shape "
                f"{psf_in.shape}",
            )
        if psf_in.shape[0] != len(names):
            raise BandMismatchError(
                "psf",
                f"has {psf_in.shape[0]} PSF image(s) (axis 0 of shape {psf_in.shape}) but bands "
                f"has {len(names)} name(s) {list(names)}; give one PSF per band, same order",
            )
        k_y, k_x = psf_in.shape[1:]
        if k_y != k_x:
            raise InvalidPSFError(
                "psf", f"PSF images must be square, got {k_y}x{k_x}; pad to a square odd size"
            )
        k = k_y
        if k % 2 == 0:
            raise InvalidPSFError(
                "psf",
                f"PSF images are {k}x{k}, an even size; pad to odd size, centre on the middle "
                f"pixel (e.g. galsim drawImage(nx={k + 1}, ny={k + 1}, ...))",
            )
        if k < 3:
            raise InvalidPSFError(
                "psf", f"PSF images are {k}x{k}; need at least 3x3 (pad with zeros)"
            )
        k_max = 2 * max(image_shape) + 1
        if k > k_max:
            raise InvalidPSFError(
                "psf",
                f"PSF images are {k}x{k}, larger than needed for a {image_shape[0]}x"
                f"{image_shape[1]} image; crop to at most {k_max}x{k_max} around the centre",
            )
        out = _to_float32(psf_in, "psf", InvalidPSFError)
        finite = np.isfinite(out)
        if not finite.all():
            idx = _first_index(~finite)
            raise InvalidPSFError(
                "psf",
                f"{int((~finite).sum())} PSF pixel(s) are NaN or inf, first at (band, y, x) = "
                f"{idx}; PSF images must be finite",
            )
        sums = out.sum(axis=(-2, -1), dtype=np.float64)
        off = np.abs(sums - 1.0) > PSF_SUM_RTOL
        if off.any():
            listed = ", ".join(f"{names[b]}: {sums[b]:.6g}" for b in range(len(names)))
            raise InvalidPSFError(
                "psf",
                f"each band's PSF must sum to 1 (relative tolerance {PSF_SUM_RTOL:g}); sums are "
                f"{{{listed}}}; normalise with psf / psf.sum(axis=(-2, -1), keepdims=True)",
            )
        c = k // 2
        for b in range(len(names)):
            py, px = np.unravel_index(int(np.argmax(out[b])), (k, k))
            if abs(int(py) - c) > 1 or abs(int(px) - c) > 1:
                raise InvalidPSFError(
                    "psf",
                    f"band {names[b]!r} PSF peaks at (y, x) = ({int(py)}, {int(px)}), not at the "
                    f"middle pixel ({c}, {c}); PSF must be centred on the middle pixel (shift it "
                    "or redraw it centred, e.g. with galsim drawImage on an odd-sized grid)",
                )
        return out

    @staticmethod
    def _check_psf_flux_fraction(value: Any, names: tuple[str, ...]) -> np.ndarray:
        if value is None:
            return np.ones(len(names))
        arr = _as_real_array(value, "psf_flux_fraction").astype(np.float64)
        if arr.ndim == 0:
            arr = np.full(len(names), float(arr))
        if arr.shape != (len(names),):
            raise BandMismatchError(
                "psf_flux_fraction",
                f"has shape {arr.shape}; give one fraction per band ({len(names)}: "
                f"{list(names)}) or a single float",
            )
        bad = ~np.isfinite(arr) | (arr < MIN_PSF_FLUX_FRACTION) | (arr > 1.0)
        if bad.any():
            listed = ", ".join(f"{names[b]}: {arr[b]:.6g}" for b in np.flatnonzero(bad))
            raise InvalidPSFError(
                "psf_flux_fraction",
                f"must be finite and in [{MIN_PSF_FLUX_FRACTION:g}, 1] (the fraction of a point "
                f"source's total flux inside its unit-sum PSF image); got {{{listed}}}. Pass "
                "None if the PSF images hold all the light",
            )
        return arr

    @staticmethod
    def _check_positions(positions: Any, image_shape: tuple[int, int]) -> np.ndarray | None:
        if positions is None:
            return None
        pos = _as_real_array(positions, "positions")
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise PositionError(
                "positions",
                f"expected shape (n_source, 2) of (x, y) pixel coordinates, got shape "
                f"{pos.shape}; for one source use np.atleast_2d([x, y])",
            )
        pos = pos.astype(np.float64, copy=True)
        finite = np.isfinite(pos).all(axis=1)
        if not finite.all():
            idx = np.flatnonzero(~finite)
            raise PositionError(
                "positions",
                f"source(s) {idx[:_MAX_LISTED].tolist()} have NaN or inf coordinates; drop them "
                "or pass positions=None to detect sources",
            )
        ny, nx = image_shape
        x, y = pos[:, 0], pos[:, 1]
        outside = (x < -0.5) | (x >= nx - 0.5) | (y < -0.5) | (y >= ny - 0.5)
        if outside.any():
            idx = np.flatnonzero(outside)
            more = f" (and {idx.size - _MAX_LISTED} more)" if idx.size > _MAX_LISTED else ""
            first = idx[0]
            raise PositionError(
                "positions",
                f"source(s) {idx[:_MAX_LISTED].tolist()}{more} lie outside the image, e.g. "
                f"source {first} at (x, y) = ({x[first]:g}, {y[first]:g}); positions are 0-based "
                f"pixel centres and must satisfy -0.5 <= x < {nx - 0.5:g}, -0.5 <= y < "
                f"{ny - 0.5:g} (subtract 1 from FITS/DS9 1-based coordinates)",
            )
        return _freeze(pos)

    # ---------------------------------------------------------------------------------------
    # alternative constructors
    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_inverse_variance(
        cls,
        image: Any,
        weight: Any,
        psf: Any,
        bands: Sequence[str] | str,
        pixel_scale: float,
        positions: Any = None,
        wcs: WCS | None = None,
        units: str = "electron",
        psf_flux_fraction: Any = None,
    ) -> Scene:
        """Build a Scene from an inverse-variance (weight) map instead of a variance.

        Parameters
        ----------
        image : array_like, shape (n_band, ny, nx)
            Flux per pixel in ``units``; see :class:`Scene`.
        weight : array_like or float, shape (n_band, ny, nx)
            Inverse variance in ``units**-2``. ``0`` masks a pixel (so do weights below
            ~3e-39, whose variance overflows float32); must be finite and ``>= 0``. A scalar
            applies to every pixel.
        psf, bands, pixel_scale, positions, wcs, units, psf_flux_fraction
            As for :class:`Scene`.

        Returns
        -------
        Scene
            The scene with ``variance = 1 / weight`` (``np.inf`` where ``weight == 0``).

        Raises
        ------
        InvalidVarianceError
            ``weight`` is negative, NaN, infinite or misshaped (``argument == "weight"``).
        SceneError
            Any other validation failure of :class:`Scene`.
        """
        weight, w_mask = _split_masked(weight)
        w = _as_real_array(weight, "weight")
        try:
            image_shape = np.shape(image)
        except ValueError:  # ragged image: let the constructor report it
            image_shape = w.shape
        if w.ndim != 0 and w.shape != image_shape:
            raise InvalidVarianceError(
                "weight",
                f"has shape {w.shape} but image has shape {image_shape}; pass one inverse "
                "variance per pixel (same shape as image) or a single float",
            )
        w = w.astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            idx = _first_index(np.atleast_1d(bad))
            value = np.atleast_1d(w)[idx]
            raise InvalidVarianceError(
                "weight",
                f"must be finite and >= 0; {int(bad.sum())} pixel(s) are negative, NaN or inf, "
                f"first at index {idx} with value {value}; use weight 0 to mask a pixel",
            )
        # weights below ~3e-39 have no finite float32 variance: they count as 0 (masked)
        with np.errstate(divide="ignore"):
            variance = np.where(w >= _MIN_VARIANCE, 1.0 / w, np.inf)
        if w_mask is not None:
            variance = np.where(w_mask, np.inf, variance)
        return cls(image, variance, psf, bands, pixel_scale, positions, wcs, units,
                   psf_flux_fraction)

    # ---------------------------------------------------------------------------------------
    # derived quantities
    # ---------------------------------------------------------------------------------------
    @property
    def n_bands(self) -> int:
        """Number of bands (planes of the image cube)."""
        return len(self.bands)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``: image size in pixels."""
        return self.image.shape[1], self.image.shape[2]

    @property
    def n_sources(self) -> int | None:
        """Number of given source positions, or ``None`` when positions are unknown."""
        return None if self.positions is None else len(self.positions)

    @property
    def wcs(self) -> WCS | None:
        """A copy of the scene's celestial WCS (0-based pixel calls), or ``None``."""
        return None if self._wcs is None else self._wcs.deepcopy()

    @cached_property
    def weight(self) -> np.ndarray:
        """Inverse variance in ``units**-2``, 0 where masked; read-only float32 (n_band, ny, nx)."""
        with np.errstate(divide="ignore"):
            w = np.where(self.mask, np.float32(0.0), np.float32(1.0) / self.variance)
        return _freeze(w.astype(np.float32, copy=False))

    @cached_property
    def unit_flux_psf(self) -> np.ndarray:
        """The image of a point source of unit *total* flux per band: ``psf *
        psf_flux_fraction`` (sums to the fraction); what the forward model convolves with, so
        that fitted fluxes are total fluxes. Read-only float32 (n_band, k, k)."""
        frac = self.psf_flux_fraction.astype(np.float32)[:, None, None]
        return _freeze((self.psf * frac).astype(np.float32))

    # ``mask`` is set in __init__ (documented here for the API reference).
    mask: np.ndarray
    """Boolean (n_band, ny, nx), read-only: ``True`` where the pixel is masked (variance inf)."""

    def band_index(self, name: str) -> int:
        """Index of band ``name`` along the band axis.

        Parameters
        ----------
        name : str
            A band name of this scene.

        Returns
        -------
        int

        Raises
        ------
        UnknownBandError
            ``name`` is not one of :attr:`bands`.
        """
        try:
            return self.bands.index(name)
        except ValueError:
            raise UnknownBandError(
                f"band {name!r} is not in this scene; choose one of {list(self.bands)}"
            ) from None

    def detection_image(self) -> np.ndarray:
        """Inverse-variance-weighted sum of the bands, the image used for source detection.

        ``D[y, x] = sum_b weight[b, y, x] * image[b, y, x]``, in ``units**-1``. For a source with
        a flat spectrum this is the optimal (maximum S/N) linear combination of the bands; its
        noise variance is ``sum_b weight[b, y, x]``, so ``D / sqrt(weight.sum(axis=0))`` is an
        S/N map. Pixels masked in every band are 0; pixels masked in some bands use the others.

        Returns
        -------
        numpy.ndarray
            float32 array of shape ``(ny, nx)``, computed in float64.
        """
        d = np.einsum("byx,byx->yx", self.weight.astype(np.float64), self.image.astype(np.float64))
        return d.astype(np.float32)

    # ---------------------------------------------------------------------------------------
    # derived scenes
    # ---------------------------------------------------------------------------------------
    def with_positions(self, positions: Any) -> Scene:
        """A copy of this scene with new source positions.

        Parameters
        ----------
        positions : array_like, shape (n_source, 2), or None
            ``(x, y)`` in 0-based pixel coordinates (see :class:`Scene`); ``None`` removes them.

        Returns
        -------
        Scene
        """
        return Scene(
            self.image, self.variance, self.psf, self.bands, self.pixel_scale,
            positions=positions, wcs=self._wcs, units=self.units,
            psf_flux_fraction=self.psf_flux_fraction,
        )  # fmt: skip

    def select_bands(self, names: Sequence[str] | str) -> Scene:
        """A scene restricted to (and ordered as) the bands ``names``.

        Parameters
        ----------
        names : sequence of str or str
            Band names of this scene; a single string selects one band.

        Returns
        -------
        Scene

        Raises
        ------
        UnknownBandError
            A name is not a band of this scene.
        BandMismatchError
            ``names`` is empty or repeats a band.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise BandMismatchError("bands", "select at least one band")
        idx = [self.band_index(n) for n in names]
        return Scene(
            self.image[idx], self.variance[idx], self.psf[idx], names, self.pixel_scale,
            positions=self.positions, wcs=self._wcs, units=self.units,
            psf_flux_fraction=self.psf_flux_fraction[idx],
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------
    # FITS I/O
    # ---------------------------------------------------------------------------------------
    def to_fits(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write the scene to a multi-extension FITS file, atomically.

        Layout: a primary HDU without data whose header holds ``BANDS`` (comma-joined names),
        ``NBANDS``, ``PIXSCALE`` (arcsec/pixel), ``BUNIT``, ``HASWCS`` and ``PBVERSN``; then
        image extensions ``IMAGE`` (cube, with the WCS header when the scene has one),
        ``VARIANCE`` (``inf`` = masked) and ``PSF`` (its header: ``FLXFRAC1`` ... the
        ``psf_flux_fraction`` of each plane); then, only if the scene has positions, a
        binary table ``POSITIONS`` with float64 columns ``X`` and ``Y`` (0-based pixel
        coordinates, ``PIXORIG = 0``). HDU checksums are written.

        The file is first written to a hidden temporary file in the target directory and then
        moved onto ``path``, so an interrupted or failed write never leaves a partial file.
        Paths ending in ``.gz`` or ``.bz2`` are compressed.

        Parameters
        ----------
        path : str or os.PathLike
            Target file.
        overwrite : bool, default False
            Replace an existing file.

        Raises
        ------
        OutputExistsError
            ``path`` exists and ``overwrite`` is False (a ``FileExistsError``).
        """
        write_fits(self._to_hdulist(), path, overwrite=overwrite, checksum=True)

    def _to_hdulist(self) -> fits.HDUList:
        primary = fits.PrimaryHDU()
        h = primary.header
        h["BANDS"] = (",".join(self.bands), "band names of the cube planes, in order")
        h["NBANDS"] = (self.n_bands, "number of bands")
        h["PIXSCALE"] = (self.pixel_scale, "[arcsec/pixel] pixel scale")
        h["BUNIT"] = (self.units, "flux per pixel unit of IMAGE")
        h["HASWCS"] = (self._wcs is not None, "IMAGE header carries the scene WCS")
        h["PBVERSN"] = (FITS_FORMAT_VERSION, "probdeblend Scene FITS format version")
        h["NEXTEND"] = (4 if self.positions is not None else 3, "number of extensions")

        img_header = fits.Header()
        if self._wcs is not None:
            img_header.extend(self._wcs.to_header(relax=True))
        for i, name in enumerate(self.bands):
            img_header[f"BAND{i + 1}"] = (name, f"band of plane {i + 1} (FITS axis 3)")
        img_header["BUNIT"] = (self.units, "flux per pixel")
        image = fits.ImageHDU(self.image, header=img_header, name="IMAGE")
        variance = fits.ImageHDU(self.variance, name="VARIANCE")
        variance.header["BUNIT"] = (f"({self.units})**2", "noise variance; inf = masked")
        psf = fits.ImageHDU(self.psf, name="PSF")
        psf.header["COMMENT"] = "One unit-sum PSF image per band, centred on the middle pixel."
        for i, frac in enumerate(self.psf_flux_fraction):
            psf.header[f"FLXFRAC{i + 1}"] = (float(frac), f"star light in PSF plane {i + 1}")
        hdus: list[Any] = [primary, image, variance, psf]
        if self.positions is not None:
            cols = [
                fits.Column(name="X", format="D", unit="pix", array=self.positions[:, 0]),
                fits.Column(name="Y", format="D", unit="pix", array=self.positions[:, 1]),
            ]
            table = fits.BinTableHDU.from_columns(cols, name="POSITIONS")
            table.header["PIXORIG"] = (0, "pixel origin: centre of first pixel is (0, 0)")
            table.header["COMMENT"] = (
                "X, Y are 0-based pixel coordinates (numpy/astropy convention); "
                "FITS/DS9 1-based coordinates are X + 1, Y + 1."
            )
            hdus.append(table)
        return fits.HDUList(hdus)

    @classmethod
    def from_fits(cls, path: str | os.PathLike[str]) -> Scene:
        """Read a scene written by :meth:`to_fits` (or a FITS file with the same layout).

        Required: primary-header keys ``BANDS`` and ``PIXSCALE`` (``BUNIT`` defaults to the
        IMAGE header's ``BUNIT``, then ``"electron"``), extensions ``IMAGE``, ``PSF`` and either
        ``VARIANCE`` or an inverse-variance extension named ``WEIGHT`` or ``IVAR`` (0 = masked).
        Optional: ``FLXFRAC1`` ... in the ``PSF`` header (``psf_flux_fraction`` per band, 1 when
        absent); ``POSITIONS`` table with columns ``X``, ``Y`` (0-based unless its header has
        ``PIXORIG = 1``) and a celestial WCS in the ``IMAGE`` header. The result is validated
        like any other :class:`Scene`.

        Parameters
        ----------
        path : str or os.PathLike
            FITS file (may be gzip/bzip2 compressed).

        Returns
        -------
        Scene

        Raises
        ------
        InputNotFoundError
            ``path`` does not exist (a ``FileNotFoundError``).
        CorruptFileError
            The file is truncated, damaged or not FITS (``hdu`` names the HDU when known).
        FITSChecksumError
            An HDU has ``CHECKSUM`` / ``DATASUM`` keywords that do not match its content
            (``hdu`` names it); checksums are verified whenever present.
        SceneError
            A required extension or header key is missing, or the content is invalid.
        """
        path = Path(path)
        with _open_verified(path) as hdul:
            present = [hdu.name for hdu in hdul]

            def get(name: str, argument: str, required: bool = True) -> Any:
                if name in hdul:
                    return hdul[name]
                if required:
                    raise SceneError(
                        argument,
                        f"FITS file {str(path)!r} has no {name!r} extension (found {present}); "
                        "write scenes with Scene.to_fits",
                    )
                return None

            primary = hdul[0].header
            version = str(primary.get("PBVERSN", primary.get("PBVERSION", FITS_FORMAT_VERSION)))
            if version != FITS_FORMAT_VERSION:
                raise SceneError(
                    "path",
                    f"{str(path)!r} has format version PBVERSN={version!r}, this probdeblend "
                    f"reads version {FITS_FORMAT_VERSION!r}; upgrade probdeblend",
                )
            for key, argument in (("BANDS", "bands"), ("PIXSCALE", "pixel_scale")):
                if key not in primary:
                    raise SceneError(
                        argument, f"primary header of {str(path)!r} has no {key!r} keyword"
                    )
            bands = str(primary["BANDS"]).split(",")
            if "NBANDS" in primary and int(primary["NBANDS"]) != len(bands):
                raise BandMismatchError(
                    "bands",
                    f"{str(path)!r}: NBANDS={primary['NBANDS']} but BANDS lists {len(bands)} "
                    f"names {bands}",
                )
            image_hdu = get("IMAGE", "image")
            image = np.asarray(image_hdu.data)
            units = primary.get("BUNIT", image_hdu.header.get("BUNIT", "electron"))
            psf_hdu = get("PSF", "psf")
            psf = np.asarray(psf_hdu.data)
            fracs = [psf_hdu.header.get(f"FLXFRAC{i + 1}") for i in range(len(bands))]
            psf_frac = None if any(f is None for f in fracs) else np.asarray(fracs, float)

            wcs = None
            has_wcs = primary.get("HASWCS")
            if has_wcs is None:
                has_wcs = any(k in image_hdu.header for k in _WCS_KEYS)
            if has_wcs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FITSFixedWarning)
                    wcs = WCS(image_hdu.header, naxis=2)

            positions = None
            table = get("POSITIONS", "positions", required=False)
            if table is not None:
                data = table.data
                names = [] if data is None else [c.upper() for c in data.columns.names]
                if "X" not in names or "Y" not in names:
                    raise PositionError(
                        "positions",
                        f"POSITIONS table of {str(path)!r} needs columns 'X' and 'Y', found "
                        f"{names}",
                    )
                positions = np.empty((len(data), 2))
                positions[:, 0] = data["X"]
                positions[:, 1] = data["Y"]
                positions -= float(table.header.get("PIXORIG", 0))

            variance_hdu = get("VARIANCE", "variance", required=False)
            if variance_hdu is not None:
                return cls(image, np.asarray(variance_hdu.data), psf, bands,
                           primary["PIXSCALE"], positions, wcs, units, psf_frac)  # fmt: skip
            for name in ("WEIGHT", "IVAR"):
                if name in hdul:
                    return cls.from_inverse_variance(
                        image, np.asarray(hdul[name].data), psf, bands, primary["PIXSCALE"],
                        positions, wcs, units, psf_frac,
                    )  # fmt: skip
            raise SceneError(
                "variance",
                f"FITS file {str(path)!r} has no 'VARIANCE' extension (nor 'WEIGHT' / 'IVAR' "
                f"inverse variance; found {present}); write scenes with Scene.to_fits",
            )

    # ---------------------------------------------------------------------------------------
    # immutability, pickling, repr
    # ---------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"Scene is immutable; cannot set {name!r}. Derive a new scene with with_positions(), "
            "select_bands() or Scene(...)"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Scene is immutable; cannot delete {name!r}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled numpy arrays come back writeable: freeze them again
        for value in state.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        self.__dict__.update(state)

    def __repr__(self) -> str:
        ny, nx = self.shape
        n_masked = int(self.mask.sum())
        parts = [
            f"bands={self.bands}",
            f"shape=({ny}, {nx})",
            f"pixel_scale={self.pixel_scale:g} arcsec/pixel",
            f"units={self.units!r}",
            f"psf_size={self.psf.shape[-1]}",
            f"n_sources={self.n_sources}",
            f"masked={n_masked}/{self.mask.size} pixels",
        ]
        if self._wcs is not None:
            parts.append("wcs=WCS")
        return f"Scene({', '.join(parts)})"



# --------------------------------------------------------------------------------------------
# verified FITS reading
# --------------------------------------------------------------------------------------------
_TRUNCATION_HINTS = ("truncated", "header size is not multiple", "corrupt", "extra bytes")


def _hdu_label(hdul: fits.HDUList, i: int) -> str:
    name = hdul[i].name or "PRIMARY"
    return f"{name!r} (HDU #{i})"


def _open_verified(path: Path) -> fits.HDUList:
    """Open a FITS file fully into memory, refusing truncated, damaged or tampered files.

    Checks, in order: the file exists; astropy can parse every header and load every data
    array without a truncation warning; the primary ``NEXTEND`` (when present) matches the
    number of extensions; every ``CHECKSUM`` / ``DATASUM`` present verifies.
    """
    if not path.exists():
        raise InputNotFoundError(
            path, f"path: {str(path)!r} does not exist; check the file name", argument="path"
        )
    if path.is_dir():
        raise CorruptFileError(path, f"path: {str(path)!r} is a folder, not a FITS file")
    fix = ("re-create or re-download it (Scene.to_fits writes checksummed files)")
    caught: list[warnings.WarningMessage] = []
    hdul = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                hdul = fits.open(path, memmap=False, lazy_load_hdus=False, checksum=False)
            except Exception as exc:  # noqa: BLE001 - astropy/zlib/bz2 raise many kinds
                raise CorruptFileError(
                    path,
                    f"path: {str(path)!r} is not a readable FITS file "
                    f"({type(exc).__name__}: {exc}); it is truncated, damaged or not FITS: {fix}",
                ) from exc
            for i, hdu in enumerate(hdul):
                try:
                    _ = hdu.data
                except Exception as exc:  # noqa: BLE001
                    raise CorruptFileError(
                        path,
                        f"path: HDU {_hdu_label(hdul, i)} of {str(path)!r} cannot be read "
                        f"({type(exc).__name__}: {exc}); the file is truncated or damaged: {fix}",
                        hdu=hdul[i].name,
                    ) from exc
        for w in caught:
            text = str(w.message)
            if any(h in text.lower() for h in _TRUNCATION_HINTS):
                raise CorruptFileError(
                    path,
                    f"path: {str(path)!r} is truncated or damaged (astropy: "
                    f"{' '.join(text.split())}); {fix}",
                )
        primary = hdul[0].header
        n_ext = len(hdul) - 1
        if "NEXTEND" in primary:
            try:
                announced = int(primary["NEXTEND"])
            except (TypeError, ValueError):
                announced = n_ext
            if announced > n_ext:
                raise CorruptFileError(
                    path,
                    f"path: {str(path)!r} holds {n_ext} extension(s) "
                    f"{[h.name for h in hdul[1:]]} but its primary header announces "
                    f"NEXTEND={announced}: the file is truncated (or extensions were removed "
                    f"without updating NEXTEND); {fix}",
                )
        for i, hdu in enumerate(hdul):
            header = hdu.header
            if "DATASUM" in header and hdu.verify_datasum() == 0:
                raise FITSChecksumError(
                    path,
                    f"path: HDU {_hdu_label(hdul, i)} of {str(path)!r} fails its DATASUM check: "
                    f"its data changed after the file was written (corruption or an edit); "
                    f"{fix}. If you changed it on purpose, rewrite it with checksum=True",
                    hdu=hdu.name,
                )
            if "CHECKSUM" in header and hdu.verify_checksum() == 0:
                raise FITSChecksumError(
                    path,
                    f"path: HDU {_hdu_label(hdul, i)} of {str(path)!r} fails its CHECKSUM check: "
                    f"its header or data changed after the file was written (corruption or an "
                    f"edit); {fix}. If you changed it on purpose, rewrite it with checksum=True",
                    hdu=hdu.name,
                )
    except BaseException:
        if hdul is not None:
            hdul.close()
        raise
    return hdul
