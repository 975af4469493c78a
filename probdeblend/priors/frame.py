"""The model frame: the pixel grid, bands and PSF in which a learned prior lives.

A prior decodes a latent vector into a **noiseless** galaxy image on the model frame's grid,
already convolved with the frame's model PSF (a narrow circular Gaussian). The renderer then
shifts it, shears it and convolves it with the *difference* kernel between a band's observed PSF
and the model PSF, so one prior serves any observation whose PSF is wider than the model PSF.

Pixel convention
----------------
The centre of pixel ``[j, i]`` (row ``j``, column ``i``) is at ``(x, y) = (i, j)``. A stamp of
``n x n`` pixels has its centre at ``((n - 1) / 2, (n - 1) / 2)``, i.e. ``(23.5, 23.5)`` for the
default 48-pixel stamp: decoded galaxies are centred there (between the four central pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import galsim
import numpy as np

from ..errors import ArgumentError, ArgumentTypeError, PriorLoadError, UnknownBandError

__all__ = ["ModelFrame", "LSST_FRAME"]


@dataclass(frozen=True)
class ModelFrame:
    """Grid, bands and model PSF of a learned prior.

    Parameters
    ----------
    bands : tuple of str
        Ordered band names (``("u", "g", "r", "i", "z", "y")``). Decoded images have one plane
        per band, in this order.
    pixel_scale : float
        arcsec / pixel of the model grid.
    stamp_size : int
        Side of the square stamp in pixels.
    psf_fwhm : float
        FWHM in arcsec of the circular Gaussian model PSF every decoded galaxy is convolved with.
    survey : str
        Survey the bands belong to (informational; used to look band properties up).
    """

    bands: tuple[str, ...]
    pixel_scale: float = 0.2
    stamp_size: int = 48
    psf_fwhm: float = 0.4
    survey: str = "LSST"

    def __post_init__(self):
        if isinstance(self.bands, str):
            raise ArgumentTypeError("bands", self.bands,
                f"bands must be a sequence of band names such as ('g', 'r'), got the string "
                f"{self.bands!r}; wrap it in a tuple"
            )
        bands = tuple(str(b) for b in self.bands)
        if not bands:
            raise ArgumentError("bands", bands, "bands must name at least one band")
        if len(set(bands)) != len(bands):
            raise ArgumentError("bands", bands, f"bands must be unique, got {bands}")
        object.__setattr__(self, "bands", bands)
        if not (self.pixel_scale > 0 and math.isfinite(self.pixel_scale)):
            raise ArgumentError("pixel_scale", self.pixel_scale,
                f"pixel_scale must be a positive number of arcsec, got {self.pixel_scale}"
            )
        if int(self.stamp_size) != self.stamp_size or self.stamp_size < 4:
            raise ArgumentError(
                "stamp_size", self.stamp_size,
                f"stamp_size must be an integer >= 4, got {self.stamp_size}"
            )
        object.__setattr__(self, "stamp_size", int(self.stamp_size))
        if not (self.psf_fwhm > 0 and math.isfinite(self.psf_fwhm)):
            raise ArgumentError(
                "psf_fwhm", self.psf_fwhm,
                f"psf_fwhm must be a positive number of arcsec, got {self.psf_fwhm}"
            )
        object.__setattr__(self, "pixel_scale", float(self.pixel_scale))
        object.__setattr__(self, "psf_fwhm", float(self.psf_fwhm))

    # -- geometry ----------------------------------------------------------------------------
    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(band, y, x)`` shape of one decoded galaxy."""
        return (self.n_bands, self.stamp_size, self.stamp_size)

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` pixel coordinates of the stamp centre, where galaxies are centred."""
        c = (self.stamp_size - 1) / 2.0
        return (c, c)

    # -- PSF -----------------------------------------------------------------------------------
    def psf(self) -> galsim.GSObject:
        """The model PSF: a unit-flux circular :class:`galsim.Gaussian` of FWHM ``psf_fwhm``."""
        return galsim.Gaussian(fwhm=self.psf_fwhm)

    def psf_image(self, size: int = 25) -> np.ndarray:
        """Model PSF drawn on the model grid: odd ``size``, centred, unit sum, float32."""
        if int(size) != size or size % 2 == 0 or size < 3:
            raise ArgumentError("size", size, f"size must be an odd integer >= 3, got {size}")
        img = self.psf().drawImage(nx=int(size), ny=int(size), scale=self.pixel_scale).array
        return (img / img.sum()).astype(np.float32)

    # -- bands ---------------------------------------------------------------------------------
    def band_index(self, band: str) -> int:
        """Position of ``band`` in :attr:`bands`; raises :class:`UnknownBandError` otherwise."""
        try:
            return self.bands.index(band)
        except ValueError:
            raise UnknownBandError(
                f"band {band!r} is not in this model frame; its bands are {list(self.bands)}"
            ) from None

    def select(self, bands) -> ModelFrame:
        """The same frame restricted to (and ordered as) ``bands``."""
        if isinstance(bands, str):
            bands = (bands,)
        bands = tuple(bands)
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise UnknownBandError(
                f"bands {missing} are not in this model frame; its bands are {list(self.bands)}"
            )
        return ModelFrame(bands, self.pixel_scale, self.stamp_size, self.psf_fwhm, self.survey)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready dictionary (inverse of :meth:`from_dict`)."""
        return {
            "bands": list(self.bands),
            "pixel_scale": self.pixel_scale,
            "stamp_size": self.stamp_size,
            "psf_fwhm": self.psf_fwhm,
            "psf_model": "gaussian",
            "survey": self.survey,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelFrame:
        """Build a frame from :meth:`to_dict` output (unknown keys are ignored)."""
        if "bands" not in d:
            raise PriorLoadError("model frame dictionary has no 'bands' entry")
        psf_model = d.get("psf_model", "gaussian")
        if psf_model != "gaussian":
            raise PriorLoadError(f"unsupported model PSF {psf_model!r}; only 'gaussian' is known")
        kw = {k: d[k] for k in ("pixel_scale", "stamp_size", "psf_fwhm", "survey") if k in d}
        return cls(bands=tuple(d["bands"]), **kw)


#: Default LSST model frame: ugrizy, 0.2"/pixel, 48x48 stamps, 0.4" FWHM Gaussian model PSF.
LSST_FRAME = ModelFrame(bands=("u", "g", "r", "i", "z", "y"))
