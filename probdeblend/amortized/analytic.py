"""Analytic bulge + disk galaxies in torch: training galaxies the prior did not generate.

NPE on the prior's own draws amortizes the model's posterior for galaxies *the prior can
make*; users' galaxies (and the GalSim scenes of :mod:`probdeblend.simulate`) are not decoded
draws, and an encoder that saw only decoded draws misreads them (v0.2: -12 % r-flux on GalSim
blends). :class:`AnalyticGalaxies` renders the bulge + disk population of
:class:`probdeblend.simulate.GalaxyPopulation` on the fly, on CPU or GPU, without GalSim, so
that a fraction of NPE scenes holds galaxies with known total flux and true intrinsic shear.

Profiles are Gaussian mixtures of the exponential (Sérsic n = 1) and de Vaucouleurs (n = 4)
laws (:data:`EXP_MIXTURE`, :data:`DEV_MIXTURE`, fitted by :func:`fit_sersic_mixture`; in the
manner of Hogg & Lang 2013): each component is sheared with the galaxy's intrinsic reduced
shear (GalSim's unit-determinant shear matrix), convolved with the model PSF (a Gaussian of
sigma ``psf_sigma`` pixels) and with the pixel (variance 1/12 px^2 added, a Gaussian
approximation of the box), then evaluated at pixel centres.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EXP_MIXTURE", "DEV_MIXTURE", "fit_sersic_mixture", "AnalyticGalaxies",
           "population_table"]

#: (amplitudes, variances in units of hlr^2) of the exponential profile; amplitudes sum to
#: 0.9992, the cumulative light profile matches to 0.13 % (radii 0.001-10 hlr).
EXP_MIXTURE = (
    (1.3e-05, 0.000294, 0.000363, 0.009353, 0.064496, 0.067555, 0.29967, 0.304782, 0.25267),
    (0.0004, 0.0019227, 0.0042152, 0.020261, 0.0973871, 0.2135118, 0.4681037, 1.0262715, 2.25),
)
#: Same for the de Vaucouleurs profile: amplitudes sum to 0.9825 (the light within 10 hlr is
#: 0.985 of the total), cumulative profile matched to 0.04 %.
DEV_MIXTURE = (
    (1.3e-05, 2.9e-05, 9.3e-05, 0.000294, 0.000861, 0.002434, 0.006335, 0.015347, 0.033532,
     0.065673, 0.111636, 0.162058, 0.19237, 0.183442, 0.126546, 0.081866),
    (2e-07, 9e-07, 3.1e-06, 1.07e-05, 3.75e-05, 0.000131, 0.0004584, 0.0016039, 0.0056113,
     0.0196317, 0.0686829, 0.2402919, 0.8406786, 2.9411748, 10.2899122, 36.0),
)


def fit_sersic_mixture(n: float, k: int, sigma_range: tuple[float, float], r_max: float = 10.0):
    """Non-negative Gaussian-mixture fit of a Sérsic profile of index ``n``, half-light radius 1.

    ``k`` circular Gaussians with standard deviations log-spaced over ``sigma_range`` (units
    of the half-light radius); amplitudes by non-negative least squares on the cumulative light
    profile ``L(<r) = P(2n, b_n r^(1/n))`` at 3,000 radii in ``[0.001, r_max]``. Returns
    ``(amplitudes, variances)`` of the non-zero components. :data:`EXP_MIXTURE` is
    ``fit_sersic_mixture(1, 12, (0.02, 1.5))``, :data:`DEV_MIXTURE`
    ``fit_sersic_mixture(4, 16, (0.0005, 6.0))`` (rounded to 6 decimals). Needs SciPy.
    """
    from scipy.optimize import nnls
    from scipy.special import gammainc, gammaincinv

    b = gammaincinv(2 * n, 0.5)
    r = np.geomspace(1e-3, r_max, 3000)
    s = np.geomspace(*sigma_range, k)
    a, _ = nnls(1 - np.exp(-0.5 * (r[:, None] / s) ** 2), gammainc(2 * n, b * r ** (1 / n)),
                maxiter=10_000)
    keep = a > 1e-6
    return a[keep], s[keep] ** 2


def population_table(n: int, survey_name: str = "LSST", bands=None, mag_range=(18.5, 26.5),
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` galaxies of :class:`probdeblend.simulate.GalaxyPopulation` as float32 arrays for
    :class:`AnalyticGalaxies` (uses GalSim's SEDs; build it where GalSim is and ship the arrays):
    ``hlr_bulge``, ``hlr_disk`` (arcsec), ``g_int`` ``(n, 2)`` and ``flux_bulge``,
    ``flux_disk`` ``(n, band)`` (electrons, survey exposure)."""
    from ..simulate import GalaxyPopulation
    from ..survey import get_survey

    survey = get_survey(survey_name)
    bands = list(bands or survey.band_names)
    t = GalaxyPopulation(mag_range=tuple(mag_range)).sample(n, survey,
                                                            np.random.default_rng(seed))

    def cols(prefix):
        return np.stack([np.asarray(t[f"{prefix}_{b}"], np.float64) for b in bands], -1)

    return {"hlr_bulge": np.asarray(t["hlr_bulge"], np.float32),
            "hlr_disk": np.asarray(t["hlr_disk"], np.float32),
            "g_int": np.stack([t["g1_int"], t["g2_int"]], -1).astype(np.float32),
            "flux_bulge": cols("flux_bulge").astype(np.float32),
            "flux_disk": cols("flux_disk").astype(np.float32)}


def _shear_matrix(g: torch.Tensor) -> torch.Tensor:
    """GalSim's shear as a unit-determinant matrix ``(N, 2, 2)`` acting on (x, y)."""
    g1, g2 = g[..., 0], g[..., 1]
    f = torch.rsqrt((1 - g1**2 - g2**2).clamp_min(1e-6))
    return torch.stack([torch.stack([1 + g1, g2], -1), torch.stack([g2, 1 - g1], -1)],
                       -2) * f[..., None, None]


def _mixture_images(hlr_pix, shear_m, amps, var, psf_var, n):
    """Unit-flux images ``(N, n, n)`` of a sheared Gaussian mixture of half-light radius
    ``hlr_pix (N,)`` pixels, convolved with a Gaussian of variance ``psf_var`` px^2."""
    dev, dt = hlr_pix.device, hlr_pix.dtype
    amps = torch.as_tensor(amps, device=dev, dtype=dt)
    var = torch.as_tensor(var, device=dev, dtype=dt)
    aat = shear_m @ shear_m.transpose(-1, -2)  # (N, 2, 2)
    cov = (hlr_pix**2)[:, None, None, None] * var[None, :, None, None] * aat[:, None]
    cov = cov + psf_var * torch.eye(2, device=dev, dtype=dt)  # (N, K, 2, 2)
    det = cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] ** 2
    ixx, iyy, ixy = cov[..., 1, 1] / det, cov[..., 0, 0] / det, -cov[..., 0, 1] / det
    ax = torch.arange(n, device=dev, dtype=dt) - (n - 1) / 2.0
    x2, y2, xy = ax[None, :] ** 2, ax[:, None] ** 2, ax[:, None] * ax[None, :]
    q = (ixx[..., None, None] * x2 + iyy[..., None, None] * y2
         + 2 * ixy[..., None, None] * xy)  # (N, K, n, n)
    norm = amps / (2 * torch.pi)
    return (torch.exp(-0.5 * q) * (norm / det.sqrt())[..., None, None]).sum(1)


class AnalyticGalaxies:
    """Draws of the analytic bulge + disk population, rendered in the prior's model frame.

    Parameters
    ----------
    table : dict from :func:`population_table` (numpy arrays or tensors)
    stamp_size : int
        Side of the model-frame stamps, pixels.
    pixel_scale : float
        arcsec per pixel.
    psf_sigma : float
        sigma (pixels) of the model frame's Gaussian PSF.
    device : torch.device
    """

    def __init__(self, table: dict, stamp_size: int, pixel_scale: float, psf_sigma: float,
                 device="cpu"):
        dev = torch.device(device)
        self.t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev)
                  for k, v in table.items()}
        self.n, self.scale, self.device = int(stamp_size), float(pixel_scale), dev
        self.psf_var = float(psf_sigma) ** 2 + 1.0 / 12.0

    def __len__(self) -> int:
        return int(self.t["hlr_disk"].shape[0])

    def render(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Galaxies ``idx`` of the table, centred on the stamp centre ``(n - 1) / 2``.

        Returns ``stamps (N, band, n, n)`` (each band normalised to a *total* flux of 1, so the
        stamp holds slightly less where the wings leave it), ``flux (N, band)`` (electrons)
        and the true intrinsic reduced shear ``g (N, 2)``.
        """
        t = {k: v[idx] for k, v in self.t.items()}
        m = _shear_matrix(t["g_int"])
        bulge = _mixture_images(t["hlr_bulge"] / self.scale, m, *DEV_MIXTURE, self.psf_var,
                                self.n)
        disk = _mixture_images(t["hlr_disk"] / self.scale, m, *EXP_MIXTURE,
                               self.psf_var, self.n)
        flux = t["flux_bulge"] + t["flux_disk"]
        fb = (t["flux_bulge"] / flux.clamp_min(1e-30))[..., None, None]
        stamps = fb * bulge[:, None] + (1 - fb) * disk[:, None]
        return stamps, flux, t["g_int"]

    def sample(self, k: int, gen: torch.Generator):
        """``k`` random galaxies of the table (see :meth:`render`)."""
        idx = torch.randint(0, len(self), (k,), generator=gen, device=self.device)
        return self.render(idx)
