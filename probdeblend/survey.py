"""Surveys and their bands: pixel scale, zero point, sky, exposure, PSF and noise.

Numbers come from `surveycodex <https://github.com/aboucaud/surveycodex>`_ (which cites its own
sources per parameter). probdeblend adds what surveycodex does not carry: a GalSim PSF model per
band and a GalSim bandpass per band for chromatic simulations.

Units and conventions
---------------------
* Images are in **electrons per pixel, integrated over the band's full survey exposure**
  (``Band.exposure_time``; e.g. the 10-year LSST depth). Fluxes are total electrons.
* ``Band.zeropoint`` is the AB magnitude that gives 1 electron per second (surveycodex
  convention), so ``flux = exposure_time * 10**(-0.4 * (mag - zeropoint))``.
* ``Band.sky_level`` is the mean sky in electrons per pixel for the full exposure.
* The per-pixel noise variance of a background-subtracted image is ``sky_level + source``
  (Poisson, gain-free electrons; read noise is negligible at full depth and ignored).

PSF models
----------
* Ground-based surveys (LSST, HSC): a Kolmogorov profile with the band's median FWHM. Long
  exposures through atmospheric turbulence are well described by the Kolmogorov spectrum
  (Fried 1966; the model used by the LSST DESC WeakLensingDeblending/BTK simulations), and the
  seeing term dominates the optics at these FWHMs.
* Space-based (Euclid VIS): an obscured Airy profile (diffraction-limited 1.2 m aperture with the
  survey's central obscuration) at the band's effective wavelength, convolved with a Gaussian whose
  width brings the total FWHM to the survey's quoted PSF FWHM (pixel response and jitter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import numpy as np
import surveycodex
from scipy.optimize import brentq

from .errors import ArgumentError, UnknownBandError, UnknownSurveyError

if TYPE_CHECKING:  # GalSim is imported where it is used: ``import probdeblend`` stays light
    import galsim

__all__ = ["Band", "Survey", "get_survey", "available_surveys"]

#: probdeblend survey names -> surveycodex names.
_SURVEY_ALIASES = {
    "lsst": "LSST",
    "hsc": "HSC",
    "euclid": "Euclid_VIS",
    "euclid_vis": "Euclid_VIS",
    "des": "DES",
    "cfhtls": "CFHTLS",
}
_SPACE_SURVEYS = {"Euclid_VIS", "Euclid_NISP", "Roman_WFI", "Roman_WFI_Deep", "COSMOS"}

#: GalSim ships LSST ugrizy throughputs only. HSC grizy use the LSST curve of the same letter and
#: Euclid IE the sum r+i+z (IE spans ~550-900 nm); both approximations affect colours only.
_BANDPASS_FILES = {
    **{("LSST", b): [f"LSST_{b}.dat"] for b in "ugrizy"},
    **{("HSC", b): [f"LSST_{b}.dat"] for b in "grizy"},
    **{("DES", b): [f"LSST_{b}.dat"] for b in "grizy"},
    ("Euclid_VIS", "IE"): ["LSST_r.dat", "LSST_i.dat", "LSST_z.dat"],
}


@dataclass(frozen=True)
class Band:
    """One photometric band of a survey.

    Parameters
    ----------
    name : str
        Band name as used in scenes and priors (``"r"``, ``"IE"``, ...).
    survey : str
        surveycodex survey name (``"LSST"``, ``"HSC"``, ``"Euclid_VIS"``).
    pixel_scale : float
        arcsec / pixel.
    zeropoint : float
        AB magnitude giving 1 electron / s.
    sky_brightness : float
        mag / arcsec^2.
    exposure_time : float
        Full survey exposure in seconds.
    psf_fwhm : float
        Median PSF FWHM in arcsec.
    effective_wavelength : float
        nm.
    space_based : bool
        Selects the PSF model (Airy vs Kolmogorov), see module docs.
    mirror_diameter, obscuration : float
        Telescope aperture (m) and linear central obscuration, used by the Airy PSF.
    """

    name: str
    survey: str
    pixel_scale: float
    zeropoint: float
    sky_brightness: float
    exposure_time: float
    psf_fwhm: float
    effective_wavelength: float
    space_based: bool = False
    mirror_diameter: float = field(default=8.36, repr=False)
    obscuration: float = field(default=0.0, repr=False)

    # -- photometry ------------------------------------------------------------------------
    def mag_to_flux(self, mag):
        """AB magnitude -> total flux in electrons over the full exposure (array-friendly)."""
        return self.exposure_time * 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - self.zeropoint))

    def flux_to_mag(self, flux):
        """Total flux in electrons -> AB magnitude. Non-positive flux gives ``+inf``."""
        flux = np.asarray(flux, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = self.zeropoint - 2.5 * np.log10(flux / self.exposure_time)
        return np.where(flux > 0, mag, np.inf)

    @property
    def magnitude_zero(self) -> float:
        """``m0`` with ``mag = m0 - 2.5 log10(flux)`` for a flux in electrons over the full
        exposure: ``zeropoint + 2.5 log10(exposure_time)``."""
        return float(self.zeropoint + 2.5 * np.log10(self.exposure_time))

    @property
    def sky_level(self) -> float:
        """Mean sky in electrons per pixel over the full exposure."""
        return float(self.mag_to_flux(self.sky_brightness) * self.pixel_scale**2)

    def noise_variance(self, image=None):
        """Per-pixel noise variance (electrons^2) of a sky-subtracted image.

        Parameters
        ----------
        image : array_like, optional
            Noiseless source image in electrons/pixel. If given, its Poisson term is added
            (negative values clipped at 0); otherwise the sky-only variance is returned as a float.
        """
        if image is None:
            return self.sky_level
        return self.sky_level + np.clip(np.asarray(image, dtype=float), 0.0, None)

    # -- PSF and bandpass ----------------------------------------------------------------
    def psf(self, fwhm: float | None = None) -> galsim.GSObject:
        """GalSim PSF of this band (flux 1). ``fwhm`` (arcsec) overrides the median seeing."""
        import galsim

        fwhm = self.psf_fwhm if fwhm is None else float(fwhm)
        if fwhm <= 0:
            raise ArgumentError("fwhm", fwhm, f"fwhm must be positive (arcsec), got {fwhm}")
        if not self.space_based:
            return galsim.Kolmogorov(fwhm=fwhm)
        lam_over_diam = self.effective_wavelength * 1e-9 / self.mirror_diameter * 206264.806
        airy = galsim.Airy(lam_over_diam=lam_over_diam, obscuration=self.obscuration)
        gauss_fwhm = _gaussian_fwhm_for(lam_over_diam, self.obscuration, fwhm)
        if gauss_fwhm <= 0:
            return airy
        return galsim.Convolve(airy, galsim.Gaussian(fwhm=gauss_fwhm))

    def psf_image(self, size: int = 25, fwhm: float | None = None) -> np.ndarray:
        """PSF drawn on this band's pixel grid, odd ``size``, centred, normalised to unit sum."""
        if size % 2 == 0 or size < 3:
            raise ArgumentError("size", size, f"size must be an odd integer >= 3, got {size}")
        img = self.psf(fwhm).drawImage(nx=size, ny=size, scale=self.pixel_scale).array
        return (img / img.sum()).astype(np.float32)

    @property
    def bandpass(self) -> galsim.Bandpass:
        """GalSim bandpass (AB zero point) used for SED -> band flux ratios. See module notes."""
        return _bandpass(self.survey, self.name)


@lru_cache(maxsize=256)
def _gaussian_fwhm_for(lam_over_diam: float, obscuration: float, fwhm: float) -> float:
    """FWHM (arcsec) of the Gaussian that brings an obscured Airy to a total FWHM ``fwhm``.

    Solved numerically on a finely sampled image: the obscured Airy has no closed-form FWHM and
    FWHMs do not add in quadrature exactly (quadrature with the unobscured Airy FWHM left the
    Euclid VIS PSF 4% too narrow). Returns 0 if the Airy alone is already as wide as ``fwhm``.
    """
    import galsim

    airy = galsim.Airy(lam_over_diam=lam_over_diam, obscuration=obscuration)
    scale = fwhm / 20.0  # 20 pixels per FWHM: FWHM good to 1e-5 (checked against 1/80)

    def excess(g: float) -> float:
        prof = airy if g <= 0 else galsim.Convolve(airy, galsim.Gaussian(fwhm=g))
        img = prof.drawImage(nx=81, ny=81, scale=scale, method="no_pixel")
        return img.calculateFWHM() - fwhm

    if excess(0.0) >= 0:
        return 0.0
    return float(brentq(excess, 0.0, fwhm, xtol=1e-4 * fwhm))


@cache
def _bandpass(survey: str, name: str) -> galsim.Bandpass:
    import galsim

    files = _BANDPASS_FILES.get((survey, name))
    if files is None:
        files = [f"LSST_{name[0].lower()}.dat"]  # closest ugrizy letter
    bps = [
        galsim.Bandpass(os.path.join(galsim.meta_data.share_dir, "bandpasses", f), "nm")
        for f in files
    ]
    bp = bps[0]
    if len(bps) > 1:  # galsim.Bandpass has no `+`: sum the throughputs on the union grid
        wave = np.unique(np.concatenate([b.wave_list for b in bps]))
        thr = np.sum([b(wave) for b in bps], axis=0)
        bp = galsim.Bandpass(galsim.LookupTable(wave, thr, interpolant="linear"), "nm")
    return bp.thin(rel_err=1e-4).withZeropoint("AB")


@dataclass(frozen=True)
class Survey:
    """A survey: its name and ordered bands. Build it with :func:`get_survey`."""

    name: str
    bands: tuple[Band, ...]

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def pixel_scale(self) -> float:
        """arcsec / pixel (shared by all bands)."""
        return self.bands[0].pixel_scale

    def band(self, name: str) -> Band:
        """The :class:`Band` called ``name``; raises :class:`UnknownBandError` otherwise."""
        for b in self.bands:
            if b.name == name:
                return b
        raise UnknownBandError(
            f"band {name!r} is not in survey {self.name}; choose one of {list(self.band_names)}"
        )

    def select(self, names) -> Survey:
        """A survey restricted to (and ordered as) ``names``."""
        return Survey(self.name, tuple(self.band(n) for n in names))

    def __getitem__(self, name: str) -> Band:
        return self.band(name)

    def __iter__(self):
        return iter(self.bands)

    def __len__(self) -> int:
        return len(self.bands)


def available_surveys() -> list[str]:
    """Names accepted by :func:`get_survey` (probdeblend aliases and surveycodex names)."""
    return sorted(set(_SURVEY_ALIASES) | set(surveycodex.available_surveys))


@cache
def get_survey(name: str) -> Survey:
    """Return the :class:`Survey` called ``name`` (``"lsst"``, ``"hsc"``, ``"euclid"``, ...).

    Names are case-insensitive; any surveycodex survey name also works.
    """
    if not isinstance(name, str):
        raise UnknownSurveyError(f"survey must be a string such as 'lsst', got {name!r}")
    codex_names = {n.lower(): n for n in surveycodex.available_surveys}
    key = _SURVEY_ALIASES.get(name.lower(), codex_names.get(name.lower()))
    if key is None:
        raise UnknownSurveyError(
            f"unknown survey {name!r}; choose one of {available_surveys()}"
        )
    sc = surveycodex.get_survey(key)
    bands = []
    for fname in sc.available_filters:
        f = sc.get_filter(fname)
        bands.append(
            Band(
                name=fname,
                survey=key,
                pixel_scale=float(sc.pixel_scale.to_value("arcsec")),
                zeropoint=float(f.zeropoint.value),
                sky_brightness=float(f.sky_brightness.value),
                exposure_time=float(f.full_exposure_time.to_value("s")),
                psf_fwhm=float(f.psf_fwhm.to_value("arcsec")),
                effective_wavelength=float(f.effective_wavelength.to_value("nm")),
                space_based=key in _SPACE_SURVEYS,
                mirror_diameter=float(sc.mirror_diameter.to_value("m")),
                obscuration=float(sc.obscuration.value),
            )
        )
    return Survey(key, tuple(bands))
