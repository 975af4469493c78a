"""Blended LSST scenes from *shifted* galaxy populations, for the deblending benchmark.

An independent GalSim scene generator (issue 10, item 5): it shares no code with
:mod:`probdeblend.simulate`'s population or renderer, only the survey description
(:func:`probdeblend.survey.get_survey`: bands, zero points, sky, 0.2"/px, PSF FWHM), the
measurement definitions (:func:`probdeblend.measure.snr`, :func:`probdeblend.measure.blendedness`)
and the :class:`probdeblend.simulate.SimulatedScene` container, so ``to_scene()`` gives a
:class:`probdeblend.Scene`.

Scenes (every kind): 80x80 px LSST ugrizy at 0.2"/px; the target at the centre plus a
sub-pixel shift ``U(-0.5, 0.5)`` px per axis; 1-3 neighbours uniform in area 0.5-3" from it;
all galaxies r = 20-25.3 with ``dN/dm ~ 10**(0.33 m)``; per band an independent PSF of the
survey FWHM x ``U(0.9, 1.2)``; Gaussian noise of variance ``sky + source`` (LSST 10-year depth as
the survey gives it). Images are electrons; positions 0-based pixel centres (x = column); shapes
are GalSim reduced shears; truth row 0 is the target.

Baseline population (never rendered on its own; each kind changes one thing of it):

* exponential disk + de Vaucouleurs bulge, one intrinsic shape ``g ~ N(0, 0.25)`` per component,
  truncated at ``|g| < 0.7``;
* disk half-light radius ``log10(hlr / arcsec) = -0.40 - 0.10 (r - 23) + N(0, 0.15)``, clipped to
  0.1-2"; bulge hlr = disk hlr x ``U(0.2, 0.6)``; bulge-to-total (r) ``U(0, 1)**2``;
* colours from redshifted CWW templates (E for bulges; Sbc / Scd / Im for disks with
  probabilities 0.4 / 0.4 / 0.2), ``z / z0 ~ Gamma(3)`` with ``z0 = 0.1 + 0.06 (r - 20)``
  (mean z 0.3 at r = 20, 1.25 at r = 25.3), clipped to 0-3.

Every Sersic component is truncated at ``min(12 hlr, R_fit)`` (GalSim ``trunc``; flux and hlr
are those of the truncated profile; left untruncated where that cuts < 1e-5 of the light).
``R_fit`` is the distance from the galaxy to the nearest scene edge less 0.8", divided by the
major-axis stretch ``(1 + |g|) / sqrt(1 - |g|^2)`` of its shape; half-light radii are capped at
``R_fit / 3``. So each galaxy's light stays in the scene: the truth fluxes equal the noiseless
image sums to the PSF wings (< 1%).

The shifted families (``KINDS``), each one change relative to the baseline:

``"colours"``
    Per-band fluxes from random power-law SEDs instead of CWW templates: each component has
    ``f_nu ~ nu**beta``, ``beta ~ U(-2.5, 0.5)``, times a step (a "4000 A break") that divides
    ``f_nu`` blueward of ``lambda_break ~ U(400, 1000)`` nm (4000 A at z = 0-1.5) by
    ``10**(0.4 D)``, ``D ~ U(0, 1.5)`` mag. Redshift-free: the break position is not tied to a
    redshift, size or magnitude. Band fluxes are the bandpass-weighted mean ``f_nu`` (AB).
    Motivation: the prior's colour space is spanned by a few redshifted templates; real galaxies
    (dust, AGN, emission lines, template mismatch) scatter off that manifold.
``"profiles"``
    One Sersic profile per galaxy, ``n ~ U(0.5, 4)`` (quantised to 0.05 so GalSim caches its
    tables), with the hlr and colours the baseline galaxy would have: pure disks, pure bulges and
    everything between, no bulge + disk split. Motivation: Sersic indices of real galaxies are
    continuous, and n < 1 (flatter than exponential) is common among faint galaxies.
``"sizes"``
    Disk hlr log-uniform in 0.1-3" (truncated at the fit cap ``R_fit / 3``), independent of
    magnitude: no magnitude-size relation, many compact and many very extended galaxies.
    Motivation: size-magnitude relations scatter widely and the prior's training range is
    narrow; sizes are what deblenders are most sensitive to.
``"knots"``
    20% of each disk's r-band flux moved into star-forming knots (``galsim.RandomKnots``,
    ``npoints ~ U{10..50}``, drawn from the disk's own truncated exponential profile, same hlr
    and shape), bluer than the disk: ``f_nu`` of the knots is the disk's times
    ``nu**Delta``, ``Delta ~ U(1, 2)`` (so e.g. u - r of the knots is 0.6-1.1 mag bluer).
    Motivation: clumpy star formation (HII regions) is ubiquitous in disks and is absent from
    smooth parametric priors.
``"psf"``
    Moffat PSF, ``beta ~ U(2.5, 4.5)`` per scene, with the same per-band FWHM range, sheared by
    a PSF ellipticity ``|g_psf| ~ U(0, 0.03)`` (random direction, common to all bands) instead of
    a round Kolmogorov. Motivation: real PSFs have stronger or weaker wings than Kolmogorov
    (optics, tracking, the outer scale) and residual ellipticity; the amortized encoder was
    trained on the Kolmogorov family.

Seeds: every random number comes from ``np.random.default_rng(seed)``; GalSim's knots use a
``galsim.BaseDeviate`` seeded from it. The baseline draws (layout, magnitudes, shapes, sizes,
templates, redshifts, PSF FWHMs, noise) are made in the same order for every kind, so the same
seed gives *paired* scenes across kinds that differ only in the shifted property.

Usage::

    from shifted_scenes import KINDS, shifted_scene    # benchmarks/ on sys.path
    sim = shifted_scene("knots", seed=3)
    scene = sim.to_scene()                              # probdeblend.Scene, true positions

Run as a script for a render-speed check: ``python benchmarks/shifted_scenes.py --n 5``.
"""

from __future__ import annotations

import math
import os
from functools import cache

import galsim
import numpy as np
from astropy.table import Table
from scipy.special import gammainc, gammaincinv

from probdeblend import measure
from probdeblend.simulate import SimulatedScene
from probdeblend.survey import get_survey

__all__ = ["KINDS", "shifted_scene"]

KINDS = ("colours", "profiles", "sizes", "knots", "psf")

SURVEY = "LSST"
REF_BAND = "r"
MAG_RANGE = (20.0, 25.3)
COUNT_SLOPE = 0.33
ANNULUS = (0.5, 3.0)            # arcsec, neighbours about the target
PSF_FWHM_FACTOR = (0.9, 1.2)    # per band
PSF_SIZE = 41                   # stored PSF images (odd)
SIGMA_G, G_MAX = 0.25, 0.7
SIZE_RELATION = (-0.40, -0.10, 0.15)   # log10 hlr_disk = a + b (r - 23) + N(0, sigma)
HLR_RANGE = (0.1, 2.0)
WIDE_HLR_RANGE = (0.1, 3.0)     # kind "sizes"
BULGE_SIZE_RATIO = (0.2, 0.6)
EDGE_MARGIN = 0.8               # arcsec kept free between a galaxy's truncation and the edge
TRUNC_MAX = 12.0                # components truncated at <= 12 hlr
DISK_TEMPLATES = ("CWW_Sbc_ext", "CWW_Scd_ext", "CWW_Im_ext")
DISK_TEMPLATE_P = (0.4, 0.4, 0.2)
BULGE_TEMPLATE = "CWW_E_ext"
Z_MAX = 3.0
KNOT_FRACTION = 0.2
KNOT_NPOINTS = (10, 50)
KNOT_BLUE = (1.0, 2.0)
POWER_BETA = (-2.5, 0.5)
BREAK_WAVE = (400.0, 1000.0)    # nm
BREAK_MAG = (0.0, 1.5)
SERSIC_N = (0.5, 4.0)
SERSIC_N_STEP = 0.05
MOFFAT_BETA = (2.5, 4.5)
PSF_G_MAX = 0.03

_WAVE = np.arange(300.0, 1200.0, 1.0)   # nm, covers LSST u-y
_Z_GRID = np.linspace(0.0, Z_MAX, 151)


# ----------------------------------------------------------------------------------------------
# Colours: AB band fluxes of an f_nu spectrum, in electrons relative to the r band
# ----------------------------------------------------------------------------------------------
@cache
def _survey():
    return get_survey(SURVEY)


@cache
def _band_tables():
    """(weights (band, wave), electrons of f_nu = 1 per band up to a constant, lambda_eff)."""
    s = _survey()
    w = np.stack([np.asarray(b.bandpass(_WAVE), dtype=float) / _WAVE for b in s])
    w /= w.sum(1, keepdims=True)          # <f_nu>_b = w_b . f_nu (AB photon-counting mean)
    e0 = np.array([float(b.mag_to_flux(0.0)) for b in s])   # electrons of AB mag 0
    lam = np.array([b.bandpass.effective_wavelength for b in s])
    return w, e0, lam


def _ratios(fnu: np.ndarray) -> np.ndarray:
    """Electrons per band / electrons in r for spectra ``fnu`` (..., wave) on ``_WAVE``."""
    w, e0, _ = _band_tables()
    e = (fnu @ w.T) * e0
    return e / e[..., [_survey().band_names.index(REF_BAND)]]


@cache
def _template_ratios(name: str) -> np.ndarray:
    """(z, band) electron ratios to r of a redshifted CWW template on ``_Z_GRID``."""
    path = os.path.join(galsim.meta_data.share_dir, "SEDs", f"{name}.sed")
    ang, flam = np.loadtxt(path, unpack=True)
    lam_rest = ang / 10.0
    fnu_rest = flam * lam_rest**2
    obs = np.stack([np.interp(_WAVE / (1 + z), lam_rest, fnu_rest) for z in _Z_GRID])
    return _ratios(obs)


def _template_colour(name: str, z: np.ndarray) -> np.ndarray:
    tab = _template_ratios(name)
    return np.stack([np.interp(z, _Z_GRID, tab[:, j]) for j in range(tab.shape[1])], -1)


def _power_law_colour(beta, lam_break, break_mag) -> np.ndarray:
    """(n, band) ratios of f_nu ~ nu^beta with f_nu / 10^(0.4 D) blueward of lam_break."""
    lam = _WAVE[None, :]
    fnu = (lam / 622.0) ** (-np.asarray(beta)[:, None])
    step = np.where(lam < np.asarray(lam_break)[:, None],
                    10.0 ** (-0.4 * np.asarray(break_mag)[:, None]), 1.0)
    return _ratios(fnu * step)


# ----------------------------------------------------------------------------------------------
# Population
# ----------------------------------------------------------------------------------------------
def _magnitudes(n, rng):
    lo, hi = MAG_RANGE
    k = COUNT_SLOPE * math.log(10)
    u = rng.uniform(size=n)
    return np.log(np.exp(k * lo) + u * (np.exp(k * hi) - np.exp(k * lo))) / k


def _shapes(n, rng):
    out = np.empty((n, 2))
    for i in range(n):
        while True:
            g = SIGMA_G * rng.standard_normal(2)
            if math.hypot(*g) < G_MAX:
                out[i] = g
                break
    return out


def _sample(kind: str, pos: np.ndarray, size: int, scale: float, rng) -> dict:
    """Per-galaxy parameters. Baseline draws first (same order for every kind), then the kind's."""
    n = len(pos)
    nb = len(_survey())
    mag = _magnitudes(n, rng)
    g = _shapes(n, rng)
    a, b, sig = SIZE_RELATION
    log_hlr = a + b * (mag - 23.0) + sig * rng.standard_normal(n)
    bulge_ratio = rng.uniform(*BULGE_SIZE_RATIO, size=n)
    bt = rng.uniform(size=n) ** 2
    z0 = 0.1 + 0.06 * (mag - 20.0)
    z = np.clip(z0 * rng.gamma(3.0, size=n), 0.0, Z_MAX)
    tmpl = rng.choice(len(DISK_TEMPLATES), size=n, p=np.asarray(DISK_TEMPLATE_P))
    u_size = rng.uniform(size=n)                      # used by "sizes"
    # distance to the nearest edge (arcsec) less the margin: truncation radius cap
    edge = np.minimum.reduce([pos[:, 0] + 0.5, size - 0.5 - pos[:, 0],
                              pos[:, 1] + 0.5, size - 0.5 - pos[:, 1]]) * scale
    gabs = np.hypot(g[:, 0], g[:, 1])
    stretch = (1 + gabs) / np.sqrt(1 - gabs**2)       # major-axis stretch of the shear
    r_fit = (edge - EDGE_MARGIN) / stretch            # in the unsheared frame
    hlr_cap = r_fit / 3.0
    if kind == "sizes":
        lo = math.log(WIDE_HLR_RANGE[0])
        hi = np.log(np.minimum(WIDE_HLR_RANGE[1], hlr_cap))
        hlr_disk = np.exp(lo + u_size * (hi - lo))
    else:
        hlr_disk = np.clip(10.0**log_hlr, HLR_RANGE[0], np.minimum(HLR_RANGE[1], hlr_cap))
    hlr_bulge = hlr_disk * bulge_ratio
    col_b = _template_colour(BULGE_TEMPLATE, z)
    col_d = np.empty((n, nb))
    for i, name in enumerate(DISK_TEMPLATES):
        sel = tmpl == i
        if sel.any():
            col_d[sel] = _template_colour(name, z[sel])
    f_r = _survey().band(REF_BAND).mag_to_flux(mag)
    p = {
        "mag": mag, "g": g, "z": z, "disk_sed": np.asarray(DISK_TEMPLATES)[tmpl],
        "bulge_frac": bt, "hlr_disk": hlr_disk, "hlr_bulge": hlr_bulge, "r_fit": r_fit,
        "sersic_n": np.full(n, np.nan), "n_knots": np.zeros(n, dtype=int),
        "flux_knots": np.zeros((n, nb)),
    }
    if kind == "colours":
        beta = rng.uniform(*POWER_BETA, size=(2, n))
        lam_b = rng.uniform(*BREAK_WAVE, size=(2, n))
        dmag = rng.uniform(*BREAK_MAG, size=(2, n))
        col_b = _power_law_colour(beta[0], lam_b[0], dmag[0])
        col_d = _power_law_colour(beta[1], lam_b[1], dmag[1])
        p["z"] = np.full(n, np.nan)
        p["disk_sed"] = np.full(n, "powerlaw")
    p["flux_bulge"] = (f_r * bt)[:, None] * col_b
    p["flux_disk"] = (f_r * (1 - bt))[:, None] * col_d
    if kind == "profiles":
        p["sersic_n"] = np.round(rng.uniform(*SERSIC_N, size=n) / SERSIC_N_STEP) * SERSIC_N_STEP
        # the single profile keeps the baseline galaxy's (untruncated) composite hlr
        p["hlr_single"] = np.minimum(
            _composite_hlr(p["flux_bulge"][:, 2], hlr_bulge, p["flux_disk"][:, 2], hlr_disk),
            hlr_cap)
    if kind == "knots":
        p["n_knots"] = rng.integers(KNOT_NPOINTS[0], KNOT_NPOINTS[1] + 1, size=n)
        blue = rng.uniform(*KNOT_BLUE, size=n)
        _, _, lam = _band_tables()
        lam_r = lam[_survey().band_names.index(REF_BAND)]
        p["flux_knots"] = KNOT_FRACTION * p["flux_disk"] * (lam_r / lam[None, :]) ** blue[:, None]
        p["flux_disk"] = (1 - KNOT_FRACTION) * p["flux_disk"]
        p["knot_blue"] = blue
    return p


def _enclosed(r, n, r0, trunc):
    """Light fraction within r of a truncated GalSim Sersic (scale radius r0)."""
    if trunc <= 0:  # GalSim: trunc = 0 is untruncated
        return gammainc(2 * n, (r / r0) ** (1.0 / n))
    full = gammainc(2 * n, (trunc / r0) ** (1.0 / n))
    return gammainc(2 * n, (min(r, trunc) / r0) ** (1.0 / n)) / full


def _composite_hlr(f_bulge, h_bulge, f_disk, h_disk):
    """Circular hlr (arcsec) of untruncated deV + exponential components (bisection)."""
    f_bulge, f_disk = np.asarray(f_bulge, float), np.asarray(f_disk, float)
    tot = f_bulge + f_disk
    b1, b4 = 1.6783469900166605, 7.66924944
    lo, hi = np.zeros_like(h_disk), 4 * np.maximum(h_disk, h_bulge) + 1e-6
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        enc = (f_bulge * gammainc(8.0, b4 * (mid / h_bulge) ** 0.25)
               + f_disk * gammainc(2.0, b1 * mid / h_disk)) / tot
        lo, hi = np.where(enc < 0.5, mid, lo), np.where(enc < 0.5, hi, mid)
    return 0.5 * (lo + hi)


def _sersic(n, hlr, r_fit):
    """Unit-flux Sersic truncated at min(12 hlr, r_fit), the ratio quantised (GalSim caching).

    Left untruncated where the untruncated profile has < 1e-5 of its light beyond that radius
    (GalSim cannot solve for the scale radius of such a truncation, and it changes nothing).
    """
    ratio = min(TRUNC_MAX, math.floor(4.0 * r_fit / hlr) / 4.0)
    beyond = 1.0 - gammainc(2 * n, gammaincinv(2 * n, 0.5) * ratio ** (1.0 / n))
    trunc = float(ratio * hlr) if beyond > 1e-5 else 0.0
    return galsim.Sersic(float(n), half_light_radius=float(hlr), trunc=trunc)


def _hlr_of(components):
    """Circularised hlr (arcsec) of a sum of (flux, truncated Sersic) in the r band."""
    fl = np.array([f for f, _ in components])
    objs = [o for _, o in components]
    lo, hi = 0.0, max(o.trunc if o.trunc > 0 else 40 * o.half_light_radius for o in objs)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        enc = sum(f * _enclosed(mid, o.n, o.scale_radius, o.trunc)
                  for f, o in zip(fl, objs, strict=True)) / fl.sum()
        lo, hi = (mid, hi) if enc < 0.5 else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------
def shifted_scene(kind: str, seed: int, size: int = 80, n_galaxies=(2, 4)) -> SimulatedScene:
    """One blended LSST scene of a shifted family (see the module docstring).

    Parameters
    ----------
    kind : one of :data:`KINDS`
    seed : int
        Same (kind, seed), same scene; the same seed across kinds gives paired scenes.
    size : int
        Pixels per side (0.2"/px).
    n_galaxies : (int, int)
        Inclusive range of galaxies per scene, target included.

    Returns
    -------
    SimulatedScene
        ``truth`` (row 0 = target): ``mag`` (r), ``flux_<b>`` (electrons, total of the
        PSF-convolved galaxy), ``g1_int``, ``g2_int``, ``g1``, ``g2`` (= intrinsic, no lensing),
        ``x``, ``y`` (pixels), ``hlr`` (arcsec, circularised, r band, PSF-free), ``snr``
        (:func:`probdeblend.measure.snr`, r band), ``is_target``, ``blendedness_total``,
        ``blendedness_closest`` (:func:`probdeblend.measure.blendedness`, r band; target only,
        others 0), ``kind`` and the population's ``z``, ``disk_sed``, ``bulge_frac`` (r),
        ``hlr_disk``, ``hlr_bulge``, ``sersic_n``, ``n_knots``, ``knot_frac`` (r).
        ``noiseless`` is (galaxy, band, y, x); ``psf`` (band, 41, 41), unit sum, with
        ``psf_flux_fraction`` (band,) the light of each unit-flux PSF inside its image.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    lo_n, hi_n = int(n_galaxies[0]), int(n_galaxies[1])
    if not 1 <= lo_n <= hi_n:
        raise ValueError(f"n_galaxies must satisfy 1 <= min <= max, got {n_galaxies}")
    size = int(size)
    survey = _survey()
    scale = survey.pixel_scale
    nb = len(survey)
    ref_idx = survey.band_names.index(REF_BAND)
    rng = np.random.default_rng(seed)

    # layout
    n_gal = int(rng.integers(lo_n, hi_n + 1))
    centre = (size - 1) / 2
    pos = np.empty((n_gal, 2))
    pos[0] = centre + rng.uniform(-0.5, 0.5, size=2)
    for i in range(1, n_gal):
        rr = math.sqrt(rng.uniform(ANNULUS[0] ** 2, ANNULUS[1] ** 2)) / scale
        ph = rng.uniform(0, 2 * math.pi)
        pos[i] = pos[0] + rr * np.array([math.cos(ph), math.sin(ph)])
    # PSF (all drawn for every kind, so the streams stay paired)
    fwhm = np.array([b.psf_fwhm for b in survey]) * rng.uniform(*PSF_FWHM_FACTOR, size=nb)
    moffat_beta = rng.uniform(*MOFFAT_BETA)
    g_psf_abs, g_psf_ang = rng.uniform(0, PSF_G_MAX), rng.uniform(0, math.pi)
    noise_seed = int(rng.integers(2**63))
    knot_seed = int(rng.integers(1, 2**31))
    if kind == "psf":
        g_psf = (g_psf_abs * math.cos(2 * g_psf_ang), g_psf_abs * math.sin(2 * g_psf_ang))
        psfs = [galsim.Moffat(beta=moffat_beta, fwhm=float(f)).shear(g1=g_psf[0], g2=g_psf[1])
                for f in fwhm]
    else:
        g_psf = (0.0, 0.0)
        psfs = [galsim.Kolmogorov(fwhm=float(f)) for f in fwhm]

    p = _sample(kind, pos, size, scale, rng)
    deviate = galsim.BaseDeviate(knot_seed)

    noiseless = np.empty((n_gal, nb, size, size), dtype=np.float32)
    hlr = np.empty(n_gal)
    flux = np.empty((n_gal, nb))
    for i in range(n_gal):
        shear = galsim.Shear(g1=float(p["g"][i, 0]), g2=float(p["g"][i, 1]))
        dx, dy = (pos[i] - centre) * scale
        if kind == "profiles":
            prof = _sersic(p["sersic_n"][i], p["hlr_single"][i], p["r_fit"][i])
            parts = [(prof, p["flux_bulge"][i] + p["flux_disk"][i])]
            hlr[i] = p["hlr_single"][i]
        else:
            bulge = _sersic(4.0, p["hlr_bulge"][i], p["r_fit"][i])
            disk = _sersic(1.0, p["hlr_disk"][i], p["r_fit"][i])
            parts = [(bulge, p["flux_bulge"][i]), (disk, p["flux_disk"][i])]
            if p["n_knots"][i] > 0:
                knots = galsim.RandomKnots(int(p["n_knots"][i]), profile=disk, rng=deviate)
                parts.append((knots, p["flux_knots"][i]))
            fb, fd = p["flux_bulge"][i, ref_idx], p["flux_disk"][i, ref_idx]
            fd = fd + p["flux_knots"][i, ref_idx]       # knots follow the disk's profile
            hlr[i] = _hlr_of([(fb, bulge), (fd, disk)]) if fb > 0 else p["hlr_disk"][i]
        flux[i] = sum(f for _, f in parts)
        for j in range(nb):
            gal = galsim.Add([o.withFlux(float(f[j])) for o, f in parts])
            gal = gal.shear(shear).shift(dx, dy)
            noiseless[i, j] = galsim.Convolve(gal, psfs[j]).drawImage(
                nx=size, ny=size, scale=scale).array

    total = noiseless.sum(0, dtype=np.float64)
    sky = np.array([b.sky_level for b in survey])[:, None, None]
    variance = sky + np.clip(total, 0, None)
    noise = np.random.default_rng(noise_seed).standard_normal(total.shape)
    image = (total + np.sqrt(variance) * noise).astype(np.float32)

    psf_img = np.empty((nb, PSF_SIZE, PSF_SIZE), dtype=np.float32)
    psf_frac = np.empty(nb)  # the light of each unit-flux PSF inside its image
    for j, psf in enumerate(psfs):
        a = psf.drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=scale).array.astype(np.float64)
        psf_frac[j] = a.sum()
        psf_img[j] = a / a.sum()

    t = Table()
    t["mag"] = p["mag"]
    for j, b in enumerate(survey.band_names):
        t[f"flux_{b}"] = flux[:, j]
    t["g1_int"], t["g2_int"] = p["g"][:, 0], p["g"][:, 1]
    t["g1"], t["g2"] = p["g"][:, 0].copy(), p["g"][:, 1].copy()
    t["x"], t["y"] = pos[:, 0], pos[:, 1]
    t["hlr"] = hlr
    t["snr"] = measure.snr(noiseless[:, ref_idx], survey.bands[ref_idx].sky_level)
    t["is_target"] = np.arange(n_gal) == 0
    b_tot, b_close = measure.blendedness(noiseless[0, ref_idx], noiseless[1:, ref_idx])
    t["blendedness_total"] = np.where(t["is_target"], float(b_tot), 0.0)
    t["blendedness_closest"] = np.where(t["is_target"], float(b_close), 0.0)
    t["kind"] = [kind] * n_gal
    t["z"] = p["z"]
    t["disk_sed"] = p["disk_sed"]
    single = kind == "profiles"
    t["bulge_frac"] = np.nan if single else p["flux_bulge"][:, ref_idx] / flux[:, ref_idx]
    t["hlr_disk"] = np.nan if single else p["hlr_disk"]
    t["hlr_bulge"] = np.nan if single else p["hlr_bulge"]
    t["sersic_n"] = p["sersic_n"]
    t["n_knots"] = p["n_knots"]
    t["knot_frac"] = p["flux_knots"][:, ref_idx] / flux[:, ref_idx]
    t.meta.update({
        "seed": int(seed), "kind": kind, "family": "shifted_scenes",
        "psf_model": "moffat" if kind == "psf" else "kolmogorov",
        "psf_fwhm": [float(f) for f in fwhm],
        "moffat_beta": float(moffat_beta) if kind == "psf" else None,
        "g_psf": [float(g_psf[0]), float(g_psf[1])],
        "blendedness_band": REF_BAND, "snr_band": REF_BAND,
    })
    return SimulatedScene(image, variance.astype(np.float32), psf_img, noiseless, t,
                          survey.band_names, scale, psf_frac)


def _main(argv=None):
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5, help="scenes per kind")
    args = ap.parse_args(argv)
    for kind in KINDS:
        shifted_scene(kind, 10_000)                     # warm caches
        t0 = time.perf_counter()
        gals = sum(len(shifted_scene(kind, s).truth) for s in range(args.n))
        dt = time.perf_counter() - t0
        print(f"{kind:9s} {args.n / dt:6.2f} scenes/s ({gals / dt:5.1f} galaxies/s)")


if __name__ == "__main__":
    _main()
