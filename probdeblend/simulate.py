"""GalSim simulations of isolated and blended galaxies with a truth table.

The simulator is used to train the priors, to test, and to benchmark. It has three layers:

1. :class:`GalaxyPopulation` samples a catalogue of galaxies (magnitude, redshift, bulge + disk
   structure, intrinsic ellipticity, per-band fluxes from SEDs), see :doc:`/simulation` for every
   distribution and its source.
2. :func:`render_galaxy` draws one catalogue row with GalSim in a given band and frame.
3. :func:`isolated_stamps` and :func:`blend_scene` build stamps / scenes with noise, PSFs and a
   truth :class:`astropy.table.Table`.

Conventions (see :doc:`/conventions`): images in electrons per pixel for the full survey exposure;
pixel (x, y) 0-based with the centre of ``image[..., j, i]`` at ``(x=i, y=j)``; ellipticities are
GalSim reduced shears ``g``; positions of truth tables are pixel coordinates in that convention.

Chromaticity: every galaxy is a de Vaucouleurs bulge with an elliptical-galaxy SED plus an
exponential disk with a spiral / irregular SED, each redshifted. Within a band each component is
achromatic, so a band image is ``flux_bulge[b] * bulge + flux_disk[b] * disk`` convolved with the
band's PSF. This is exact for a PSF that is constant across the band, as used here, and makes
drawing ~an order of magnitude faster than integrating over wavelength.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import cache

import galsim
import numpy as np
from astropy.table import Table
from scipy.special import gammainc

from . import measure
from .errors import ArgumentError, OutputExistsError
from .survey import Band, Survey, get_survey

__all__ = [
    "GalaxyPopulation",
    "Frame",
    "render_galaxy",
    "isolated_stamps",
    "blend_scene",
    "BlendConfig",
    "SimulatedScene",
]

_DISK_SEDS = ("CWW_Sbc_ext", "CWW_Scd_ext", "CWW_Im_ext")
_BULGE_SED = "CWW_E_ext"
_B_N = {1: 1.6783469900166605, 4: 7.66924944}  # Sersic b_n (half-light normalisation)


# ----------------------------------------------------------------------------------------------
# Population
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalaxyPopulation:
    """Distributions of galaxy properties, each documented with its source in docs/simulation.md.

    Parameters
    ----------
    mag_range : (float, float)
        AB magnitude range in ``ref_band`` (default r in 20-25.3, the LSST gold-sample depth).
    ref_band : str
        Band whose magnitude is drawn; other bands follow from the SEDs.
    count_slope : float
        Slope ``alpha`` of the differential number counts ``dN/dm ~ 10**(alpha m)``.
    size_relation : (float, float, float)
        ``(a, b, sigma)``: disk scale length ``ln(r_d / arcsec) = a + b (m - 23)`` with log-normal
        scatter ``sigma`` (Miller et al. 2013 form).
    hlr_range : (float, float)
        Disk half-light radius clipped to this range (arcsec) so galaxies fit in stamps.
    bulge_fraction_max : float
        Bulge-to-total flux ratio in the reference band drawn as ``U(0, 1)**2 * max``.
    bulge_size_ratio : (float, float)
        Bulge/disk half-light-radius ratio drawn uniformly in this range.
    sigma_g : float
        Per-component dispersion of the intrinsic reduced shear, truncated at ``g_max``.
    g_max : float
        Largest intrinsic ``|g|``.
    z0_relation : (float, float)
        ``z0 = a m + b`` of the Smail-type redshift distribution ``p(z) ~ z^2 exp(-z/z0)``
        (LSST Science Book eq. 3.8, mean ``3 z0``; applied with the reference-band magnitude).
    disk_sed_weights : tuple of 3 floats
        Probabilities of the Sbc, Scd and Im templates for disks.
    """

    mag_range: tuple[float, float] = (20.0, 25.3)
    ref_band: str = "r"
    count_slope: float = 0.33
    size_relation: tuple[float, float, float] = (-1.145, -0.269, 0.3)
    hlr_range: tuple[float, float] = (0.1, 2.0)
    bulge_fraction_max: float = 1.0
    bulge_size_ratio: tuple[float, float] = (0.3, 0.7)
    sigma_g: float = 0.25
    g_max: float = 0.7
    z0_relation: tuple[float, float] = (0.0417, -0.744)
    disk_sed_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)

    def __post_init__(self):
        lo, hi = self.mag_range
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ArgumentError(
                "mag_range", self.mag_range,
                f"mag_range must be (faint > bright) finite, got {self.mag_range}"
            )
        if not 0 < self.g_max < 1:
            raise ArgumentError("g_max", self.g_max, f"g_max must be in (0, 1), got {self.g_max}")

    def sample(self, n: int, survey: Survey, rng: np.random.Generator) -> Table:
        """Draw ``n`` galaxies. Returns a Table with one row per galaxy.

        Columns: ``mag`` (ref band, AB), ``z``, ``disk_sed``, ``bulge_frac`` (ref band),
        ``hlr_disk``, ``hlr_bulge``, ``hlr`` (arcsec, circularised half-light radius of the
        PSF-free galaxy in the reference band), ``g1_int``, ``g2_int`` and per band ``b``:
        ``flux_bulge_<b>``, ``flux_disk_<b>``, ``flux_<b>`` (electrons).
        """
        n = int(n)
        lo, hi = self.mag_range
        # dN/dm ~ 10^(a m): inverse CDF of an exponential in m on [lo, hi]
        k = self.count_slope * math.log(10)
        u = rng.uniform(size=n)
        mag = np.log(np.exp(k * lo) + u * (np.exp(k * hi) - np.exp(k * lo))) / k
        z0 = np.clip(self.z0_relation[0] * mag + self.z0_relation[1], 0.02, None)
        z = z0 * rng.gamma(3.0, size=n)  # z/z0 ~ Gamma(3): the exponent the z0 fit is for
        z = np.clip(z, 0.0, 3.0)
        a, b, sig = self.size_relation
        r_d = np.exp(a + b * (mag - 23.0) + sig * rng.standard_normal(n))
        hlr_disk = np.clip(_B_N[1] * r_d, *self.hlr_range)
        hlr_bulge = hlr_disk * rng.uniform(*self.bulge_size_ratio, size=n)
        bulge_frac = rng.uniform(size=n) ** 2 * self.bulge_fraction_max
        g1, g2 = _truncated_shear(n, self.sigma_g, self.g_max, rng)
        sed_idx = rng.choice(len(_DISK_SEDS), size=n, p=np.asarray(self.disk_sed_weights))
        t = Table()
        t["mag"] = mag
        t["z"] = z
        t["disk_sed"] = np.asarray(_DISK_SEDS)[sed_idx]
        t["bulge_frac"] = bulge_frac
        t["hlr_disk"] = hlr_disk
        t["hlr_bulge"] = hlr_bulge
        t["hlr"] = _composite_hlr(bulge_frac, hlr_bulge, hlr_disk)
        t["g1_int"] = g1
        t["g2_int"] = g2
        ref = survey.band(self.ref_band)
        total_ref = ref.mag_to_flux(mag)
        for band in survey:
            col_b = _colour(_BULGE_SED, band, ref, z)
            col_d = np.empty(n)
            for i, name in enumerate(_DISK_SEDS):
                sel = sed_idx == i
                col_d[sel] = _colour(name, band, ref, z[sel])
            t[f"flux_bulge_{band.name}"] = total_ref * bulge_frac * col_b
            t[f"flux_disk_{band.name}"] = total_ref * (1 - bulge_frac) * col_d
            t[f"flux_{band.name}"] = t[f"flux_bulge_{band.name}"] + t[f"flux_disk_{band.name}"]
        return t


def _truncated_shear(n, sigma, g_max, rng):
    g = np.empty((0, 2))
    while len(g) < n:
        cand = sigma * rng.standard_normal((2 * (n - len(g)) + 8, 2))
        g = np.concatenate([g, cand[np.hypot(cand[:, 0], cand[:, 1]) < g_max]])
    return g[:n, 0], g[:n, 1]


def _composite_hlr(bulge_frac, hlr_bulge, hlr_disk, iters=60):
    """Circular half-light radius of a de Vaucouleurs + exponential sum (vectorised bisection)."""
    def enclosed(r):
        fb = gammainc(8.0, _B_N[4] * (r / hlr_bulge) ** 0.25)
        fd = gammainc(2.0, _B_N[1] * (r / hlr_disk))
        return bulge_frac * fb + (1 - bulge_frac) * fd

    lo = np.zeros_like(hlr_disk)
    hi = np.maximum(hlr_disk, hlr_bulge) * 4 + 1e-6
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = enclosed(mid) < 0.5
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


@cache
def _sed(name: str) -> galsim.SED:
    path = os.path.join(galsim.meta_data.share_dir, "SEDs", f"{name}.sed")
    return galsim.SED(path, wave_type="Ang", flux_type="flambda")


@cache
def _colour_table(sed_name: str, band: Band, ref: Band):
    """Flux ratio (electrons in ``band`` / electrons in ``ref``) on a redshift grid."""
    zs = np.linspace(0.0, 3.0, 151)
    ratios = np.empty_like(zs)
    sed = _sed(sed_name)
    for i, zz in enumerate(zs):
        s = sed.atRedshift(zz)
        m_b = s.calculateMagnitude(band.bandpass)
        m_r = s.calculateMagnitude(ref.bandpass)
        ratios[i] = band.mag_to_flux(m_b) / ref.mag_to_flux(m_r)
    return zs, ratios


def _colour(sed_name, band, ref, z):
    zs, ratios = _colour_table(sed_name, band, ref)
    return np.interp(z, zs, ratios)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """Where stamps are drawn: survey bands, pixel scale, size and PSF.

    Parameters
    ----------
    survey : str
        Survey name for :func:`probdeblend.get_survey` (``"lsst"``).
    bands : tuple of str, optional
        Subset / order of the survey's bands (default all).
    stamp_size : int
        Pixels per side.
    pixel_scale : float, optional
        arcsec/pixel (default the survey's).
    psf_fwhm : float or None
        ``None`` uses each band's survey PSF (Kolmogorov / Airy, see :mod:`probdeblend.survey`);
        a number uses one circular Gaussian of that FWHM (arcsec) in every band, as in the
        priors' model frame.
    psf_size : int
        Odd size of the PSF images stored with scenes.
    """

    survey: str = "lsst"
    bands: tuple[str, ...] | None = None
    stamp_size: int = 48
    pixel_scale: float | None = None
    psf_fwhm: float | None = None
    psf_size: int = 41

    @classmethod
    def of_model_frame(cls, frame) -> Frame:
        """The simulation frame of a prior's :class:`~probdeblend.priors.frame.ModelFrame`:
        its survey, bands, grid and Gaussian model PSF (noiseless galaxies the prior sees)."""
        return cls(survey=frame.survey.lower(), bands=tuple(frame.bands),
                   stamp_size=frame.stamp_size, pixel_scale=frame.pixel_scale,
                   psf_fwhm=frame.psf_fwhm)

    @property
    def survey_obj(self) -> Survey:
        s = get_survey(self.survey)
        return s.select(self.bands) if self.bands is not None else s

    @property
    def scale(self) -> float:
        return self.pixel_scale if self.pixel_scale is not None else self.survey_obj.pixel_scale

    @property
    def band_names(self) -> tuple[str, ...]:
        return self.survey_obj.band_names

    def psf(self, band: Band, fwhm_scale: float = 1.0) -> galsim.GSObject:
        """GalSim PSF of ``band`` in this frame; ``fwhm_scale`` multiplies the FWHM."""
        if self.psf_fwhm is not None:
            return galsim.Gaussian(fwhm=self.psf_fwhm * fwhm_scale)
        return band.psf(band.psf_fwhm * fwhm_scale)

    def psf_images(self, fwhm_scale: float = 1.0) -> np.ndarray:
        """(band, psf_size, psf_size) unit-sum PSF images on this frame's pixel grid."""
        return self.psf_images_and_fractions(fwhm_scale)[0]

    def psf_images_and_fractions(self, fwhm_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`psf_images` (float32) and the fraction of each band's PSF light inside its
        image, ``(band,)`` float64 (:attr:`probdeblend.Scene.psf_flux_fraction`), from one
        draw of each PSF."""
        imgs, fracs = [], []
        for band in self.survey_obj:
            img = self.psf(band, fwhm_scale).drawImage(
                nx=self.psf_size, ny=self.psf_size, scale=self.scale
            ).array.astype(np.float64)
            fracs.append(img.sum())  # a unit-flux PSF: the sum is the light inside the image
            imgs.append(img / img.sum())
        return np.asarray(imgs, dtype=np.float32), np.asarray(fracs, dtype=np.float64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bands"] = list(self.band_names)
        d["pixel_scale"] = self.scale
        return d


def _components(row, band_name: str, shear=(0.0, 0.0)):
    """(bulge, disk) GalSim profiles of a catalogue row in a band, flux in electrons."""
    g_int = galsim.Shear(g1=float(row["g1_int"]), g2=float(row["g2_int"]))
    g_lens = galsim.Shear(g1=float(shear[0]), g2=float(shear[1]))
    total = g_lens + g_int  # GalSim: apply the intrinsic shape, then the lensing shear
    bulge = galsim.DeVaucouleurs(
        half_light_radius=float(row["hlr_bulge"]), flux=float(row[f"flux_bulge_{band_name}"])
    ).shear(total)
    disk = galsim.Exponential(
        half_light_radius=float(row["hlr_disk"]), flux=float(row[f"flux_disk_{band_name}"])
    ).shear(total)
    return bulge, disk


def render_galaxy(row, band: Band, frame: Frame, offset=(0.0, 0.0), shear=(0.0, 0.0),
                  psf: galsim.GSObject | None = None) -> np.ndarray:
    """Draw one catalogue row in one band: noiseless, PSF-convolved, pixel-integrated.

    Parameters
    ----------
    row : astropy Table row (or mapping) from :meth:`GalaxyPopulation.sample`.
    band : Band
    frame : Frame
    offset : (float, float)
        (dx, dy) of the galaxy centre from the stamp centre, in **pixels**.
    shear : (float, float)
        Constant reduced shear (g1, g2) applied on top of the intrinsic shape.
    psf : galsim.GSObject, optional
        Overrides ``frame.psf(band)``.

    Returns
    -------
    ndarray (stamp_size, stamp_size), float32, electrons per pixel. The stamp centre is pixel
    coordinate ``((n - 1) / 2, (n - 1) / 2)``.
    """
    bulge, disk = _components(row, band.name, shear)
    gal = galsim.Add(bulge, disk).shift(offset[0] * frame.scale, offset[1] * frame.scale)
    psf = frame.psf(band) if psf is None else psf
    n = frame.stamp_size
    img = galsim.Convolve(gal, psf).drawImage(nx=n, ny=n, scale=frame.scale)
    return img.array.astype(np.float32)


def _add_noise(noiseless: np.ndarray, survey: Survey, rng: np.random.Generator,
               rotate90: bool = False):
    """Sky + source noise on a (band, y, x) sky-subtracted image. Returns (noisy, variance).

    The noise is Gaussian with the Poisson variance ``sky_level + source`` (electrons): at full
    survey depth the sky is >~ 150 electrons per pixel (Euclid VIS; >= 1.6e3 in LSST bands),
    where the Gaussian limit of the Poisson distribution is accurate. ``rotate90`` rotates the
    unit noise field by 90 degrees (used for the rotated twin of a scene: the same realisation,
    rotated with the scene).
    """
    sky = np.array([b.sky_level for b in survey], dtype=float)[:, None, None]
    variance = sky + np.clip(noiseless, 0, None)
    unit = rng.standard_normal(noiseless.shape)
    if rotate90:
        unit = np.rot90(unit, k=-1, axes=(-2, -1))  # matches (x, y) -> (c - dy, c + dx)
    noisy = noiseless + np.sqrt(variance) * unit
    return noisy.astype(np.float32), variance.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Isolated stamps
# ----------------------------------------------------------------------------------------------
def isolated_stamps(n: int, frame: Frame | None = None, population: GalaxyPopulation | None = None,
                    seed: int = 0, noise: bool = False, max_offset: float = 0.0):
    """Isolated galaxies, one per stamp, centred (optionally offset), noiseless and noisy.

    Parameters
    ----------
    n : int
        Number of stamps.
    frame : Frame
        Bands, pixel scale, stamp size and PSF (default: LSST ugrizy, 48x48 at 0.2", survey PSFs).
    population : GalaxyPopulation
    seed : int
        Same seed -> same catalogue, images and noise.
    noise : bool
        Also return noisy images and their per-pixel variance.
    max_offset : float
        Galaxy centres drawn uniformly within ``+-max_offset`` pixels of the stamp centre.

    Returns
    -------
    dict with ``noiseless`` (n, band, y, x) float32 electrons/pixel, ``psf`` (band, k, k),
    ``truth`` (Table: population columns + ``x``, ``y``, ``snr``), and if ``noise``:
    ``image`` and ``variance``.
    """
    frame = frame or Frame()
    population = population or GalaxyPopulation()
    rng = np.random.default_rng(seed)
    survey = frame.survey_obj
    cat = population.sample(n, survey, rng)
    offsets = rng.uniform(-max_offset, max_offset, size=(n, 2)) if max_offset > 0 else np.zeros(
        (n, 2))
    nb, s = len(survey), frame.stamp_size
    out = np.empty((n, nb, s, s), dtype=np.float32)
    same_psf = frame.psf_fwhm is not None
    for i in range(n):
        row = cat[i]
        if same_psf:  # one PSF for all bands: draw bulge and disk once, scale per band
            out[i] = _draw_components_once(row, survey, frame, offsets[i])
        else:
            for j, band in enumerate(survey):
                out[i, j] = render_galaxy(row, band, frame, offsets[i])
    centre = (s - 1) / 2
    cat["x"] = centre + offsets[:, 0]
    cat["y"] = centre + offsets[:, 1]
    ref = survey.band(population.ref_band)
    cat["snr"] = measure.snr(out[:, survey.band_names.index(ref.name)], ref.sky_level)
    result = {"noiseless": out, "psf": frame.psf_images(), "truth": cat}
    if noise:
        imgs, var = zip(*(_add_noise(o, survey, rng) for o in out), strict=True)
        result["image"], result["variance"] = np.stack(imgs), np.stack(var)
    return result


def _draw_components_once(row, survey, frame, offset):
    ref_name = survey.band_names[0]
    unit = dict(row)
    for bname in survey.band_names:  # unit-flux components, fluxes applied per band below
        unit[f"flux_bulge_{bname}"] = 1.0
        unit[f"flux_disk_{bname}"] = 1.0
    bulge, disk = _components(unit, ref_name)
    psf = frame.psf(survey.bands[0])
    n, sc = frame.stamp_size, frame.scale
    dx, dy = offset[0] * sc, offset[1] * sc
    b_img = galsim.Convolve(bulge.shift(dx, dy), psf).drawImage(nx=n, ny=n, scale=sc).array
    d_img = galsim.Convolve(disk.shift(dx, dy), psf).drawImage(nx=n, ny=n, scale=sc).array
    fb = np.array([row[f"flux_bulge_{b}"] for b in survey.band_names])[:, None, None]
    fd = np.array([row[f"flux_disk_{b}"] for b in survey.band_names])[:, None, None]
    return (fb * b_img + fd * d_img).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Blended scenes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlendConfig:
    """How blended scenes are laid out.

    Parameters
    ----------
    frame : Frame
        Survey, bands, scene size (``stamp_size``, default 80 px = 16" for LSST) and PSF.
    n_galaxies : (int, int)
        Inclusive range of the number of galaxies per scene (target included).
    max_shift : float
        Target centre drawn uniformly in a disk of this radius (arcsec) about the scene centre.
    annulus : (float, float)
        Inner / outer radius (arcsec) about the target where neighbours are placed uniformly
        in area.
    shear : (float, float)
        Constant reduced shear (g1, g2) applied to every galaxy.
    psf_fwhm_range : (float, float)
        Each scene's PSF FWHM is the band's median times a factor uniform in this range.
    """

    frame: Frame = field(default_factory=lambda: Frame(stamp_size=80))
    n_galaxies: tuple[int, int] = (2, 4)
    max_shift: float = 0.2
    annulus: tuple[float, float] = (0.5, 3.0)
    shear: tuple[float, float] = (0.0, 0.0)
    psf_fwhm_range: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        lo, hi = self.n_galaxies
        if not 1 <= lo <= hi:
            raise ArgumentError(
                "n_galaxies", self.n_galaxies,
                f"n_galaxies must satisfy 1 <= min <= max, got {self.n_galaxies}"
            )
        if not 0 <= self.annulus[0] < self.annulus[1]:
            raise ArgumentError("annulus", self.annulus,
                                f"annulus must be (inner, outer) with 0 <= inner < outer, "
                                f"got {self.annulus}")
        if math.hypot(*self.shear) >= 1:
            raise ArgumentError("shear", self.shear, f"|shear| must be < 1, got {self.shear}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frame"] = self.frame.to_dict()
        return d


@dataclass
class SimulatedScene:
    """A simulated scene: noisy image, variance, PSFs, per-galaxy noiseless images and truth.

    ``truth`` has one row per galaxy (row 0 = target), with catalogue columns, ``x``, ``y``
    (pixels), ``g1``, ``g2`` (lensed reduced shear of the PSF-free galaxy), ``snr`` and, for
    the target, ``blendedness_total`` and ``blendedness_closest`` (others 0).
    """

    image: np.ndarray        # (band, y, x) electrons
    variance: np.ndarray     # (band, y, x) electrons^2
    psf: np.ndarray          # (band, k, k), unit sum
    noiseless: np.ndarray    # (galaxy, band, y, x)
    truth: Table
    bands: tuple[str, ...]
    pixel_scale: float
    psf_flux_fraction: np.ndarray | None = None  # (band,) PSF light inside ``psf``; None: 1

    def to_scene(self, with_positions: bool = True):
        """The observation as a :class:`probdeblend.Scene` (positions from the truth if asked;
        the PSF images' flux fractions, so that fitted fluxes are total fluxes)."""
        from .scene import Scene

        pos = np.stack([self.truth["x"], self.truth["y"]], -1) if with_positions else None
        return Scene(self.image, self.variance, self.psf, self.bands, self.pixel_scale,
                     positions=pos, psf_flux_fraction=self.psf_flux_fraction)


def blend_scene(config: BlendConfig | None = None, population: GalaxyPopulation | None = None,
                seed: int = 0, rotate90: bool = False, catalog: Table | None = None,
                positions: np.ndarray | None = None) -> SimulatedScene:
    """Simulate one blended scene.

    Parameters
    ----------
    config : BlendConfig
    population : GalaxyPopulation
    seed : int
        Determines the catalogue, the layout, the PSF jitter and the noise.
    rotate90 : bool
        Return the 90-degree rotated twin of the scene drawn with this seed: positions rotated by
        90 deg about the scene centre, intrinsic ellipticities rotated by 90 deg (g -> -g), the
        same shear, PSFs and the same noise realisation (rotated pairs cancel shape noise in shear
        tests, Massey et al. 2007).
    catalog, positions : optional
        Use this catalogue (rows = galaxies, target first) and these (x, y) pixel positions
        instead of drawing them.

    Returns
    -------
    SimulatedScene
    """
    config = config or BlendConfig()
    population = population or GalaxyPopulation()
    frame = config.frame
    survey = frame.survey_obj
    rng = np.random.default_rng(seed)
    n_gal = int(rng.integers(config.n_galaxies[0], config.n_galaxies[1] + 1))
    cat = population.sample(n_gal, survey, rng) if catalog is None else Table(catalog, copy=True)
    n_gal = len(cat)
    s, scale = frame.stamp_size, frame.scale
    centre = (s - 1) / 2
    if positions is None:
        r = config.max_shift * np.sqrt(rng.uniform())
        phi = rng.uniform(0, 2 * np.pi)
        pos = [(centre + r * np.cos(phi) / scale, centre + r * np.sin(phi) / scale)]
        r_in, r_out = config.annulus
        for _ in range(n_gal - 1):
            rr = np.sqrt(rng.uniform(r_in**2, r_out**2))
            ph = rng.uniform(0, 2 * np.pi)
            pos.append((pos[0][0] + rr * np.cos(ph) / scale, pos[0][1] + rr * np.sin(ph) / scale))
        pos = np.asarray(pos)
    else:
        pos = np.asarray(positions, dtype=float).reshape(n_gal, 2)
    fwhm_scale = rng.uniform(*config.psf_fwhm_range)
    noise_seed = rng.integers(2**63)
    if rotate90:  # (x, y) -> (-y, x) about the centre; a 90 deg rotation of the shape is g -> -g
        dx, dy = pos[:, 0] - centre, pos[:, 1] - centre
        pos = np.stack([centre - dy, centre + dx], -1)
        cat["g1_int"] = -np.asarray(cat["g1_int"])
        cat["g2_int"] = -np.asarray(cat["g2_int"])
    psfs = [frame.psf(b, fwhm_scale) for b in survey]
    noiseless = np.empty((n_gal, len(survey), s, s), dtype=np.float32)
    for i in range(n_gal):
        for j, band in enumerate(survey):
            noiseless[i, j] = render_galaxy(cat[i], band, frame, pos[i] - centre, config.shear,
                                            psf=psfs[j])
    total = noiseless.sum(0)
    image, variance = _add_noise(total, survey, np.random.default_rng(noise_seed), rotate90)
    cat["x"], cat["y"] = pos[:, 0], pos[:, 1]
    lensed = [galsim.Shear(g1=config.shear[0], g2=config.shear[1])
              + galsim.Shear(g1=float(a), g2=float(b))
              for a, b in zip(cat["g1_int"], cat["g2_int"], strict=True)]
    cat["g1"] = [sh.g1 for sh in lensed]
    cat["g2"] = [sh.g2 for sh in lensed]
    ref_idx = survey.band_names.index(population.ref_band)
    ref = survey.bands[ref_idx]
    cat["snr"] = measure.snr(noiseless[:, ref_idx], ref.sky_level)
    b_tot, b_close = measure.blendedness(noiseless[0, ref_idx], noiseless[1:, ref_idx])
    cat["is_target"] = np.arange(n_gal) == 0
    cat["blendedness_total"] = np.where(cat["is_target"], float(b_tot), 0.0)
    cat["blendedness_closest"] = np.where(cat["is_target"], float(b_close), 0.0)
    cat.meta.update({"seed": int(seed), "rotate90": bool(rotate90),
                     "shear": list(config.shear), "psf_fwhm_scale": float(fwhm_scale),
                     "blendedness_band": population.ref_band})
    psf_img, psf_frac = frame.psf_images_and_fractions(fwhm_scale)
    return SimulatedScene(image, variance, psf_img, noiseless, cat, survey.band_names, scale,
                          psf_frac)


def with_shear(config: BlendConfig, g1: float, g2: float) -> BlendConfig:
    """A copy of ``config`` with the constant shear set to (g1, g2)."""
    return replace(config, shear=(float(g1), float(g2)))


# ----------------------------------------------------------------------------------------------
# Survey fields (whole images with a realistic galaxy density), for survey-scale deblending
# ----------------------------------------------------------------------------------------------
#: LSST Science Book (LSST Science Collaboration 2009, arXiv:0912.0201), eq. 3.7: cumulative
#: galaxy counts ``N(< i) = 46 * 10**(0.31 (i - 25))`` per arcmin^2 (valid 20.5 < i < 25.5).
LSST_COUNTS_NORM = 46.0
LSST_COUNTS_SLOPE = 0.31


def lsst_number_density(mag_min: float, mag_max: float) -> float:
    """Galaxies per arcmin^2 between two AB magnitudes (LSST Science Book eq. 3.7, i band)."""
    def cum(m):
        return LSST_COUNTS_NORM * 10.0 ** (LSST_COUNTS_SLOPE * (float(m) - 25.0))

    return max(cum(mag_max) - cum(mag_min), 0.0)


@dataclass
class SimulatedField:
    """A simulated survey field: noisy image cube, variance, PSFs, WCS and truth catalogue.

    ``truth`` has one row per galaxy with :meth:`GalaxyPopulation.sample`'s columns plus
    ``id``, ``x``, ``y`` (0-based pixels, :class:`~probdeblend.Scene` convention), ``ra``,
    ``dec`` (deg), ``g1``, ``g2`` (lensed reduced shear), ``snr`` (reference band, Arcelin et
    al. 2021 definition, :func:`probdeblend.measure.snr`) and ``blendedness`` (Bosch et al.
    2018, reference band, all other galaxies of the field as neighbours).
    """

    image: np.ndarray       # (band, y, x) electrons
    variance: np.ndarray    # (band, y, x) electrons^2
    psf: np.ndarray         # (band, k, k), unit sum
    truth: Table
    bands: tuple[str, ...]
    pixel_scale: float
    wcs: object = None
    psf_flux_fraction: np.ndarray | None = None  # (band,) PSF light inside ``psf``; None: 1

    def to_scene(self, with_positions: bool = False):
        """The field as a :class:`probdeblend.Scene` (with its WCS; truth positions if asked)."""
        from .scene import Scene

        pos = (np.stack([self.truth["x"], self.truth["y"]], -1)
               if with_positions and len(self.truth) else None)
        return Scene(self.image, self.variance, self.psf, self.bands, self.pixel_scale,
                     positions=pos, wcs=self.wcs, psf_flux_fraction=self.psf_flux_fraction)

    def to_fits(self, path, overwrite: bool = False) -> None:
        """Write the field as a Scene FITS file (:meth:`probdeblend.Scene.to_fits` layout) with
        the truth catalogue as an extra binary-table extension ``TRUTH``.

        :meth:`probdeblend.Scene.from_fits` reads the file as a scene (it ignores ``TRUTH``);
        :meth:`from_fits` reads both back. The write is atomic (temporary file, fsync,
        rename), so an interrupted write never leaves a file that looks complete.
        """
        import tempfile
        from pathlib import Path

        from astropy.io import fits

        path = Path(path)
        if path.exists() and not overwrite:
            raise OutputExistsError(
                path, f"{str(path)!r} exists; pass overwrite=True to replace it"
            )
        hdul = self.to_scene()._to_hdulist()
        truth = Table(self.truth, copy=False)
        hdu = fits.table_to_hdu(truth)
        hdu.name = "TRUTH"
        hdul.append(hdu)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                   dir=path.parent or ".")
        os.close(fd)
        try:
            hdul.writeto(tmp, overwrite=True, checksum=True)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def from_fits(cls, path) -> SimulatedField:
        """Read a field written by :meth:`to_fits`."""
        from .scene import Scene

        scene = Scene.from_fits(path)
        truth = Table.read(path, hdu="TRUTH")
        return cls(np.asarray(scene.image), np.asarray(scene.variance), np.asarray(scene.psf),
                   truth, tuple(scene.bands), scene.pixel_scale, scene.wcs,
                   np.asarray(scene.psf_flux_fraction))


def _field_wcs(n_x: int, n_y: int, scale: float, center: tuple[float, float]):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(center[0]), float(center[1])]
    w.wcs.crpix = [(n_x + 1) / 2.0, (n_y + 1) / 2.0]  # FITS 1-based: the image centre
    w.wcs.cdelt = [-scale / 3600.0, scale / 3600.0]   # RA increases to the left (east)
    w.wcs.cunit = ["deg", "deg"]
    return w


def _field_stamp_half(hlr_arcsec: float, fwhm_arcsec: float, scale: float) -> int:
    r = 5.0 * hlr_arcsec + 2.0 * fwhm_arcsec
    return int(np.clip(math.ceil(r / scale), 8, 80))


def simulate_field(size: int | tuple[int, int] = 2048, survey: str = "lsst",
                   bands: tuple[str, ...] | None = None,
                   population: GalaxyPopulation | None = None, density: float | None = None,
                   shear: tuple[float, float] = (0.0, 0.0), seed: int = 0,
                   center: tuple[float, float] = (150.0, 2.2), psf_size: int = 41,
                   progress: bool = False) -> SimulatedField:
    """Simulate a survey field: galaxies at a realistic density, noise at full depth, truth.

    Galaxies are drawn from ``population`` (default :class:`GalaxyPopulation`, AB 20-25.3 in
    its reference band r) and placed uniformly at random over the field; their number is
    Poisson with mean ``density * area``. The default density comes from the published LSST
    galaxy counts, LSST Science Book (LSST Science Collaboration 2009, arXiv:0912.0201,
    sec. 3.7.2, eq. 3.7): ``N(< i) = 46 * 10**(0.31 (i - 25))`` galaxies per arcmin^2,
    evaluated between the population's magnitude limits (about 56 per arcmin^2 for 20-25.3,
    i.e. ~2,600 galaxies on a 2048x2048 LSST field of 6.8' x 6.8'). The counts are i-band
    counts applied to the population's reference-band (r) limits, which overestimates the
    density slightly (galaxies are ~0.3-0.5 mag fainter in r than in i): a conservative
    (more crowded) field. Magnitudes within the limits follow the population's own count
    slope (0.33, close to the 0.31 of eq. 3.7).

    Every galaxy is rendered in each band with the band's survey PSF (Kolmogorov / Airy, see
    :mod:`probdeblend.survey`), pixel-integrated, on a stamp of ``5 hlr + 2 FWHM`` radius that
    is added into the field (sources near the edges are cut by the image edge as in real
    data). Noise is Gaussian with the Poisson variance ``sky + source`` of the full survey
    depth (LSST 10-year, :mod:`probdeblend.survey`), as in :func:`blend_scene`.

    Parameters
    ----------
    size : int or (ny, nx)
        Field size in pixels.
    survey, bands
        Survey name and optional band subset (default LSST ugrizy).
    population : GalaxyPopulation, optional
    density : float, optional
        Galaxies per arcmin^2; default from the LSST counts above.
    shear : (float, float)
        Constant reduced shear applied to every galaxy.
    seed : int
        Same seed, same field (catalogue, positions, noise).
    center : (ra, dec)
        Degrees; the field carries a TAN WCS centred there with the survey's pixel scale.
    psf_size : int
        Odd size of the stored PSF images.
    progress : bool
        tqdm progress bar over galaxies.

    Returns
    -------
    SimulatedField
        ``.to_scene()`` gives the :class:`~probdeblend.Scene`, ``.to_fits(path)`` writes it
        with its truth table.

    Examples
    --------
    >>> field = simulate_field(256, seed=1)                       # doctest: +SKIP
    >>> field.to_fits("field.fits"); len(field.truth)             # doctest: +SKIP
    """
    ny, nx = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if ny < 8 or nx < 8:
        raise ArgumentError("size", size, f"size must be at least 8 pixels per side, got {size!r}")
    if math.hypot(*shear) >= 1:
        raise ArgumentError("shear", shear, f"|shear| must be < 1, got {shear}")
    population = population or GalaxyPopulation()
    frame = Frame(survey=survey, bands=bands, psf_size=psf_size)
    surv = frame.survey_obj
    scale = frame.scale
    area = nx * ny * (scale / 60.0) ** 2  # arcmin^2
    if density is None:
        density = lsst_number_density(*population.mag_range)
    if not (np.isfinite(density) and density >= 0):
        raise ArgumentError(
            "density", density,
            f"density must be a non-negative number per arcmin^2, got {density!r}"
        )
    rng = np.random.default_rng(seed)
    n_gal = int(rng.poisson(density * area))
    cat = population.sample(n_gal, surv, rng)
    x = rng.uniform(-0.5, nx - 0.5, n_gal)
    y = rng.uniform(-0.5, ny - 0.5, n_gal)
    noise_seed = int(rng.integers(2**63))
    psfs = [frame.psf(b) for b in surv]
    fwhm_max = max(b.psf_fwhm for b in surv)
    ref_idx = surv.band_names.index(population.ref_band)
    nb = len(surv)
    field_img = np.zeros((nb, ny, nx), dtype=np.float32)
    ref_stamps = []
    it = range(n_gal)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="galaxies", unit="gal")
    for i in it:
        row = cat[i]
        h = _field_stamp_half(float(row["hlr"]), fwhm_max, scale)
        ix, iy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        off = galsim.PositionD(x[i] - ix, y[i] - iy)
        x0, x1 = max(ix - h, 0), min(ix + h + 1, nx)
        y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
        sx, sy = slice(x0 - (ix - h), x1 - (ix - h)), slice(y0 - (iy - h), y1 - (iy - h))
        ref_stamp = None
        for j, band in enumerate(surv):
            bulge, disk = _components(row, band.name, shear)
            img = galsim.Convolve(galsim.Add(bulge, disk), psfs[j]).drawImage(
                nx=2 * h + 1, ny=2 * h + 1, scale=scale, offset=off).array
            field_img[j, y0:y1, x0:x1] += img[sy, sx]
            if j == ref_idx:
                ref_stamp = img
        ref_stamps.append((ref_stamp, (y0, y1, x0, x1), (sy, sx)))
    sky = np.array([b.sky_level for b in surv], dtype=np.float64)
    snr = np.empty(n_gal)
    blended = np.empty(n_gal)
    ref_field = field_img[ref_idx]
    for i, (stamp, (y0, y1, x0, x1), (sy, sx)) in enumerate(ref_stamps):
        snr[i] = float(measure.snr(stamp, sky[ref_idx]))
        st = stamp[sy, sx].astype(np.float64)
        tot = ref_field[y0:y1, x0:x1].astype(np.float64)
        denom = float((st * tot).sum())
        blended[i] = 1.0 - float((st * st).sum()) / denom if denom > 0 else np.nan
    noise_rng = np.random.default_rng(noise_seed)
    variance = np.empty_like(field_img)
    for j in range(nb):  # band by band: bounded float64 temporaries
        var = sky[j] + np.clip(field_img[j], 0, None).astype(np.float64)
        field_img[j] += (np.sqrt(var) * noise_rng.standard_normal((ny, nx))).astype(np.float32)
        variance[j] = var
    wcs = _field_wcs(nx, ny, scale, center)
    cat.add_column(np.arange(n_gal, dtype=np.int64), name="id", index=0)
    cat["x"], cat["y"] = x, y
    cat["x"].unit = cat["y"].unit = "pix"
    if n_gal:
        sky_c = wcs.pixel_to_world(x, y)
        cat["ra"], cat["dec"] = sky_c.ra.deg, sky_c.dec.deg
    else:
        cat["ra"], cat["dec"] = np.zeros(0), np.zeros(0)
    cat["ra"].unit = cat["dec"].unit = "deg"
    lensed = [galsim.Shear(g1=shear[0], g2=shear[1]) + galsim.Shear(g1=float(a), g2=float(b))
              for a, b in zip(cat["g1_int"], cat["g2_int"], strict=True)]
    cat["g1"] = np.array([s.g1 for s in lensed], dtype=np.float64)
    cat["g2"] = np.array([s.g2 for s in lensed], dtype=np.float64)
    cat["snr"] = snr
    cat["blendedness"] = blended
    # FITS-friendly (<= 8 character) keys: seed, survey, galaxies / arcmin^2, field area
    # (arcmin^2), shear, pixel origin, band of snr / blendedness, number-count source
    cat.meta.update({
        "SEED": int(seed), "SURVEY": survey, "DENSITY": float(density), "AREA": float(area),
        "SHEAR1": float(shear[0]), "SHEAR2": float(shear[1]), "PIXORIG": 0,
        "REFBAND": population.ref_band,
        "COUNTS": "LSST Science Book eq. 3.7: N(<m) = 46 * 10**(0.31 (m - 25)) / arcmin^2",
    })  # fmt: skip
    psf_img, psf_frac = frame.psf_images_and_fractions()
    return SimulatedField(field_img, variance.astype(np.float32), psf_img, cat,
                          surv.band_names, scale, wcs, psf_frac)


__all__ += ["simulate_field", "SimulatedField", "lsst_number_density"]
