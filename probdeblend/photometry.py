"""Closed-form photometry: the flux posterior of sources whose morphology is given.

Fluxes enter the scene model linearly. Given every source's unit-flux model image ``T_s``
(its morphology and position, through the band's PSF), the pixel likelihood is Gaussian in the
fluxes ``f`` of each band, and with a flat prior on ``f`` so is their posterior::

    (T W T^T) f = T W d,        cov(f) = (T W T^T)^-1        (W = inverse variance)

solved for all sources of a blend jointly. Negative fluxes are allowed, so a source on pure
noise gets an interval that includes 0. Two terms cover what this exact-given-the-morphology
posterior does not:

* **footprint misfit**: where the fit leaves a residual larger than the noise in a source's
  footprint (template above 5 % of its peak), that source's covariance is multiplied by the
  footprint's reduced chi^2 (>= 1);
* **flux conservation** (``redistribute``): a template that is too compact for the galaxy
  (q's mean morphology misses a few per cent of the light of bright galaxies) leaves the missed
  light in the residual, and the least-squares flux comes out low. Each source then also gets
  its share of the residual in its footprint, in proportion to the sources' fitted model
  images (the flux-conserving step of the SDSS and scarlet deblenders); the corrected fluxes
  are still linear in the data, so their covariance is exact given the templates. The model
  image of a draw stays ``sum_s f_s T_s`` (the template's shape with the corrected total);
* **morphology error** (:class:`Systematic`, calibrated per encoder on held-out simulated
  scenes by ``benchmarks/calibrate_photometry.py``; the values depend on how many morphology
  draws the mixture has, see :func:`systematic_of`): a fractional systematic ``flux_sys``
  added in quadrature, ``sd^2 += (flux_sys * flux)^2 * inflation ** power`` (``power`` < 1
  lets it grow more slowly than the footprint misfit, which is large for bright sources), one
  fractional error per source shared by all bands (colours stay sharp); the statistical
  part scaled by ``stat_scale``; both growing with the source's blendedness in the fitted
  model (``flux_sys_blend``, ``stat_blend``: a neighbour's morphology error leaks into a
  blended source's flux, while an isolated source's flux conserves its light whatever its
  template); and heavy tails (a morphology can be badly off), Student-t with ``df`` degrees
  of freedom, on the systematic alone (``tail="systematic"``) or on the whole error
  (``tail="total"``, a scale mixture: one ``chi^2`` draw per source and flux draw scales
  its statistical and systematic errors together).

Used by :meth:`probdeblend.ScenePosterior.photometry` (one scene; morphology draws of q rendered
by the scene renderer) and by the catalogue, :func:`probdeblend.deblend.deblend` (templates of
q's mean rendered source by source in local boxes, solved blend group by blend group).
Fluxes are in the image's units (total flux of the PSF-convolved source).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["linear_fluxes", "flux_draws", "Systematic", "systematic_of", "local_templates",
           "group_photometry", "model_blendedness", "psd_factor", "REDISTRIBUTE"]

#: Footprint of the residual redistribution of q's morphologies (:func:`linear_fluxes`): pixels
#: where a source's template exceeds this fraction of its peak. On 200 held-out family (a)
#: scenes (lsst-vae-amortized v0.4, q's mean morphology) the r-flux median error went from
#: -4.7 % to -0.5 % (NMAD 8.2 % to 6.8 %) at 0.003; at 0.05 it was -2.6 %.
REDISTRIBUTE = 0.003

#: Band-summed flux S/N at which :class:`Systematic`'s ``flux_sys`` is quoted when it grows
#: with the source's S/N (``snr_power``).
SNR_REF = 100.0

#: :func:`group_photometry` pads group boxes up to multiples of this many pixels so that groups
#: of one size and similar extent share a batch.
_BOX_STEP = 8
#: :func:`group_photometry` solves each group on the pixels where one of its templates exceeds
#: this fraction of its peak (~40 % of a 72 px box for LSST galaxies).
_SUPPORT = 1e-4
#: Template pixels (sources x bands x box area) per batch of :func:`group_photometry`: bounds
#: its float64 work arrays to a few tens of MB.
_BATCH_ELEMENTS = 100_000


def linear_fluxes(tmpl: np.ndarray, image: np.ndarray, weight: np.ndarray,
                  redistribute: float | None = None):
    """Weighted least-squares fluxes of unit-flux templates.

    Parameters
    ----------
    tmpl : array (M, S, band, y, x) or (G, M, S, band, y, x)
        Unit-flux model images of ``S`` sources for ``M`` morphology draws; with the leading
        axis, ``G`` independent blends of the same size solved in one batch.
    image, weight : array (band, y, x) or (G, band, y, x)
        Data and inverse variance (0 or non-finite: masked).
    redistribute : float, optional
        Add to each source's fitted flux its share of the fit's residual (flux conservation,
        see the module docstring) over the pixels where its template exceeds this fraction
        of its peak (e.g. 0.003); the covariance is then that of the corrected estimator.
        ``None``: the least-squares fluxes alone.

    Returns
    -------
    mean : ([G,] M, band, S)
    cov : ([G,] M, band, S, S)
    chi2 : ([G,] S, band)
        Reduced chi^2 of the first morphology's least-squares fit in each source's footprint
        (template above 5 % of its peak); 0 where a footprint has no unmasked pixel.
    """
    tmpl = np.asarray(tmpl)
    batched = tmpl.ndim == 6
    if not batched:
        tmpl, image, weight = tmpl[None], np.asarray(image)[None], np.asarray(weight)[None]
    g, m, n_src, n_b = tmpl.shape[:4]
    img = np.asarray(image, np.float64).reshape(g, n_b, -1)
    w = np.asarray(weight, np.float64).reshape(g, n_b, -1)
    wf = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    t = np.asarray(tmpl, np.float64).reshape(g, m, n_src, n_b, -1)
    tw = t * wf[:, None, None]
    gram = np.einsum("gmsbp,gmtbp->gmbst", tw, t)
    rhs = np.einsum("gmsbp,gbp->gmbs", tw, img)
    del tw
    eye = np.eye(n_src) * 1e-12 * np.maximum(np.einsum("...ss->...s", gram).max(-1), 1e-30)[
        ..., None, None]
    cov = np.linalg.inv(gram + eye)
    mean = np.einsum("gmbst,gmbt->gmbs", cov, rhs)
    resid = (img - np.einsum("gbs,gsbp->gbp", mean[:, 0], t[:, 0])) ** 2 * wf  # (G, B, P)
    foot = _footprint(t[:, 0], wf[:, None], 0.05)  # (G, S, B, P)
    chi2 = np.einsum("gsbp,gbp->gsb", foot, resid) / np.maximum(foot.sum(-1), 1)
    if redistribute is not None:
        mean, cov = _redistribute(t, img, wf, mean, cov, gram, float(redistribute))
    return (mean, cov, chi2) if batched else (mean[0], cov[0], chi2[0])


def _footprint(t, wf, fraction: float):
    """Unmasked pixels where each template ``t (..., S, B, P)`` exceeds ``fraction`` of its
    peak (``wf``: inverse variance, 0 = masked, broadcast against ``t``)."""
    return (t > fraction * t.max(-1, keepdims=True)) & (wf > 0)


def _redistribute(t, y, wf, mean, cov, gram, tau: float):
    """Least-squares fluxes plus each source's share of the residual, and their covariance.

    ``t (G, M, S, B, P)`` templates, ``y, wf (G, B, P)`` data and inverse variance,
    ``mean (G, M, B, S)``, ``cov (G, M, B, S, S)`` and ``gram`` ``T W T^T (G, M, B, S, S)`` of
    the least-squares fit (``G`` independent blends).
    Source ``s`` gets the residual of pixel ``p`` in proportion ``r_sp = m_sp / sum_t m_tp``
    of the (non-negative) fitted model images ``m``, over its footprint (template above
    ``tau`` of its peak; unmasked pixels), divided by its template's sum (the light per unit
    flux: 1, or the PSF image's flux fraction), so that the share is a total flux.
    The corrected fluxes are linear in the data, ``f' = A d`` with
    ``A = C T W + R (I - T^T C T W)`` (ratios held fixed), so their covariance is
    ``A V A^T`` with ``V`` the pixel variances.
    """
    tb = np.swapaxes(t, 2, 3)                                           # (G, M, B, S, P)
    # the ratios are weights: their pixel work is done in float32 (half the memory traffic);
    # every product is accumulated over one footprint's pixels, rounding ~1e-7 of the result
    t32 = tb.astype(np.float32)
    m_img = np.clip(mean, 0.0, None).astype(np.float32)[..., None] * t32
    total = m_img.sum(-2, keepdims=True)
    foot = ((t32 > np.float32(tau) * t32.max(-1, keepdims=True))
            & (wf[:, None, :, None, :] > 0) & (total > 0))
    ratio = np.divide(m_img, total, out=np.zeros_like(m_img), where=foot)
    del m_img, foot, total
    # a residual is light in the image; a unit of flux puts sum(t) of it there (the PSF
    # image's flux fraction, Scene.psf_flux_fraction; 1 for unit-sum PSFs): in flux, / sum(t)
    tsum = t32.sum(-1, keepdims=True)
    ratio = np.divide(ratio, tsum, out=np.zeros_like(ratio), where=tsum > 0)
    model = (mean[..., None, :] @ tb)[..., 0, :]                        # (G, M, B, P)
    resid = (y[:, None] - model).astype(np.float32)
    mean = mean + (ratio @ resid[..., None])[..., 0]
    # A = K C T W + R with K = I - R T^T; with V W = 1 on unmasked pixels (R is 0 on masked
    # ones) A V A^T = K C G C K^T + K C rt^T + rt C K^T + R V R^T, G = T W T^T, rt = R T^T:
    # only (S, S) contractions over the pixels
    rt = (ratio @ np.swapaxes(t32, -1, -2)).astype(np.float64)
    var = np.where(wf > 0, 1.0 / np.where(wf > 0, wf, 1.0), 0.0).astype(np.float32)
    rvr = ((ratio * var[:, None, :, None]) @ np.swapaxes(ratio, -1, -2)).astype(np.float64)
    k = np.eye(rt.shape[-1]) - rt
    kc = k @ cov
    cov = (kc @ gram @ np.swapaxes(kc, -1, -2) + kc @ np.swapaxes(rt, -1, -2)
           + rt @ np.swapaxes(kc, -1, -2) + rvr)
    return mean, cov


def psd_factor(cov: np.ndarray) -> np.ndarray:
    """A factor ``F`` with ``F F^T = cov`` for a stack of covariance matrices ``(..., S, S)``:
    the Cholesky factor, or, where rounding has left a matrix with a slightly negative
    eigenvalue (two sources at the same position have the same template, and the fit cannot
    split their flux: the Gram matrix is singular), ``V sqrt(max(w, 0))`` of the symmetrised
    matrix's eigen-decomposition, which keeps the unconstrained direction's (large)
    variance and drops the negative rounding."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        return v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


def systematic_noise(rng: np.random.Generator, shape, df: float = np.inf) -> np.ndarray:
    """Unit-scale draws of a systematic error: standard normal (``df`` infinite) or
    Student-t with ``df`` degrees of freedom, of ``shape``."""
    u = rng.standard_normal(shape)
    if np.isfinite(df):
        u = u * np.sqrt(df / rng.chisquare(df, size=shape))
    return u


class Systematic(NamedTuple):
    """The error model that the closed-form flux posterior adds to its statistical errors
    (see the module docstring); ``Systematic()`` adds nothing (the statistical errors given
    the morphology, Gaussian).

    Attributes
    ----------
    flux_sys : float
        Fractional morphology error: scale ``flux_sys * flux * inflation ** (power / 2)``,
        one error per source shared by its bands.
    power : float
        Power of the footprint inflation (``max(chi2, 1)``) that scales ``flux_sys``.
    df : float
        Degrees of freedom of the Student-t tail (``inf``: Gaussian).
    stat_scale : float
        Factor on the statistical standard deviations (> 0).
    tail : {"systematic", "total"}
        What the Student-t tail scales: the systematic alone, or the whole error.
    flux_sys_blend, stat_blend : float
        Growth of ``flux_sys`` and ``stat_scale`` with the source's blendedness ``beta``
        (:func:`model_blendedness`): a source uses ``flux_sys + flux_sys_blend * beta`` and
        ``stat_scale + stat_blend * beta`` (a neighbour's morphology error leaks into a
        blended source's flux; an isolated source's flux conserves its light).
    snr_power : float
        Growth of the fractional systematic with the S/N ``nu`` of the source's band-summed
        flux (statistical errors): times ``(nu / SNR_REF) ** snr_power`` (``SNR_REF`` = 100).
        A brighter galaxy shows more of the structure that the prior's galaxies only
        approximate, and its fitted flux moves by a larger fraction (the Laplace
        posterior's: ``calibration.laplace``). 0: no dependence.
    snr_max : float
        ``nu`` is clipped here: the largest S/N of the sources the model was fitted on, so
        that the power law is not extrapolated to brighter ones (``inf``: no clip).
    """

    flux_sys: float = 0.0
    power: float = 1.0
    df: float = np.inf
    stat_scale: float = 1.0
    tail: str = "systematic"
    flux_sys_blend: float = 0.0
    stat_blend: float = 0.0
    snr_power: float = 0.0
    snr_max: float = np.inf

    def factors(self, blendedness, snr=None) -> tuple[np.ndarray, np.ndarray]:
        """``(stat_scale + stat_blend * beta, (flux_sys + flux_sys_blend * beta) * (nu /
        SNR_REF) ** snr_power)`` of each source's blendedness ``beta`` (NaN counts 0) and
        band-summed S/N ``nu`` (needed only with ``snr_power``; clipped at ``snr_max``): its
        factor on the statistical spread and its fractional systematic."""
        beta = np.nan_to_num(np.asarray(blendedness, np.float64))
        eps = self.flux_sys + self.flux_sys_blend * beta
        if self.snr_power:
            if snr is None:
                raise ValueError("Systematic.factors: snr_power needs each source's S/N")
            nu = np.clip(np.nan_to_num(np.asarray(snr, np.float64)), 1e-3, self.snr_max)
            eps = eps * (nu / SNR_REF) ** self.snr_power
        return self.stat_scale + self.stat_blend * beta, eps

    def scale(self, sd, flux, inflation=1.0, blendedness=0.0, snr=None) -> np.ndarray:
        """The model's Gaussian scale of a source's flux error, ``sqrt((k sd)^2 + (eps
        max(flux, 0))^2 inflation^power)`` with ``(k, eps)`` = :meth:`factors`
        (``sd``: the statistical error, footprint inflation included); times a Student-t
        of ``df`` degrees of freedom with ``tail="total"``."""
        k, eps = self.factors(blendedness, snr)
        return np.hypot(k * np.asarray(sd, np.float64),
                        eps * np.clip(flux, 0.0, None) * np.asarray(inflation, np.float64)
                        ** (0.5 * self.power))

    @property
    def is_identity(self) -> bool:
        """True when the model leaves the statistical errors as they are."""
        return (self.flux_sys == 0 and self.flux_sys_blend == 0 and self.stat_scale == 1
                and self.stat_blend == 0
                and (self.tail == "systematic" or not np.isfinite(self.df)))

    @classmethod
    def from_card(cls, entry: dict) -> Systematic:
        """The model of a model-card calibration entry (:class:`Systematic`'s fields by name;
        missing ones take the defaults, ``df`` null: Gaussian)."""
        df = entry.get("df")
        return cls(float(entry["flux_sys"]), float(entry.get("power", 1.0)),
                   np.inf if df is None else float(df), float(entry.get("stat_scale", 1.0)),
                   str(entry.get("tail", "systematic")), float(entry.get("flux_sys_blend", 0.0)),
                   float(entry.get("stat_blend", 0.0)), float(entry.get("snr_power", 0.0)),
                   np.inf if entry.get("snr_max") is None else float(entry["snr_max"]))

    def perturb(self, draws, rng: np.random.Generator, blendedness=0.0,
                inflation=1.0) -> np.ndarray:
        """Apply this model to flux draws that already carry the statistical errors (e.g.
        the Laplace posterior's, :meth:`probdeblend.ScenePosterior.laplace`).

        Each source's deviation from its draws' mean ``f_bar`` is scaled by ``k = stat_scale
        + stat_blend * beta`` and a fractional systematic of scale ``eps = (flux_sys +
        flux_sys_blend * beta) * (nu / SNR_REF) ** snr_power * inflation ** (power / 2)`` is
        added (``nu``: the S/N of the source's band-summed flux over the draws), one error
        per source and draw shared by its bands (colours stay sharp). ``tail="total"``:
        ``f_bar + w (k (f - f_bar) + eps f_bar z)``, ``z`` standard normal and the whole error of a
        source's draw (all bands) times one ``w = sqrt(df / chi^2_df)`` (Student-t marginals
        of the combined scale, where the draws are Gaussian); ``"systematic"``: ``(f_bar + k
        (f - f_bar)) (1 + eps u)``, ``u`` Student-t (each draw's fluxes scaled together).

        Parameters
        ----------
        draws : array (..., n, S, band)
            Flux draws (any flux unit), ``n`` draws of ``S`` sources.
        rng : numpy Generator
        blendedness : array (S,) or float
            Each source's blendedness ``beta`` (NaN counts 0).
        inflation : array (S, band) or float
            Footprint reduced chi^2 (``max(chi2, 1)`` is used).

        Returns
        -------
        array (..., n, S, band), float64.
        """
        f = np.asarray(draws, np.float64)
        n_src = f.shape[-2]
        mean = f.mean(-3, keepdims=True)
        snr = None
        if self.snr_power:  # of the band-summed flux (..., S)
            tot = f.sum(-1)
            snr = tot.mean(-2) / np.maximum(tot.std(-2), 1e-300)
        k, eps = (np.broadcast_to(x, f.shape[:-3] + (n_src,))[..., None, :]
                  for x in self.factors(blendedness, snr))  # (..., 1, S)
        infl = np.maximum(np.broadcast_to(np.asarray(inflation, np.float64),
                                          f.shape[-2:]), 1.0)
        rel = eps[..., None] * infl ** (0.5 * self.power)  # (..., 1, S, band)
        k = k[..., None]
        shape = f.shape[:-1]
        if self.tail == "total":
            dev = (k * (f - mean)
                   + rel * np.clip(mean, 0.0, None) * rng.standard_normal(shape)[..., None])
            w = (np.sqrt(self.df / rng.chisquare(self.df, size=shape)) if np.isfinite(self.df)
                 else np.ones(shape))
            return mean + w[..., None] * dev
        return ((mean + k * (f - mean))
                * (1.0 + rel * systematic_noise(rng, shape, self.df)[..., None]))

    def check(self, argument: str = "systematic") -> Systematic:
        """This model, or :class:`~probdeblend.errors.ArgumentError` naming ``argument``
        when a value is out of range."""
        from .errors import ArgumentError

        fix = ("give Systematic(flux_sys >= 0, power, df > 0, stat_scale > 0, "
               "tail='systematic' or 'total', flux_sys_blend, stat_blend, snr_power, "
               "snr_max > 0) with "
               "flux_sys + flux_sys_blend >= 0 and stat_scale + stat_blend > 0")
        nums = (self.flux_sys, self.power, self.stat_scale, self.flux_sys_blend,
                self.stat_blend, self.snr_power)
        ok_max = self.snr_max > 0  # inf allowed
        ok = (self.tail in ("systematic", "total") and bool(np.all(np.isfinite(nums)))
              and self.flux_sys >= 0 and self.flux_sys + self.flux_sys_blend >= 0
              and self.df > 0 and self.stat_scale > 0
              and self.stat_scale + self.stat_blend > 0 and ok_max)
        if not ok:
            raise ArgumentError(argument, self, fix)
        return self


def flux_draws(mean: np.ndarray, cov: np.ndarray, chi2: np.ndarray, num_samples: int,
               rng: np.random.Generator, flux_sys: float = 0.0, power: float = 1.0,
               df: float = np.inf, stat_scale: float = 1.0, tail: str = "systematic",
               flux_sys_blend: float = 0.0, stat_blend: float = 0.0, snr_power: float = 0.0,
               snr_max: float = np.inf, blendedness: np.ndarray | None = None) -> dict:
    """Draws of the flux posterior: a mixture over the ``M`` morphology draws.

    Each morphology draw contributes its Gaussian (``cov`` times the footprint inflation;
    ``stat_scale`` scales this closed-form spread, within and between the morphology draws,
    about the mixture's mean) plus the systematic: per source, one fractional error shared by
    every band (a wrong morphology moves all bands' fluxes together, so colours stay sharp),
    of scale ``flux_sys * flux * inflation ** (power / 2)`` per band. Heavy tails (a
    morphology that is badly off), Student-t with ``df`` degrees of freedom (``inf`` =
    Gaussian): ``tail="systematic"``, the systematic alone is Student-t; ``"total"``, each
    source's whole error of a draw (statistical and systematic, all bands) is scaled by one
    ``sqrt(df / chi^2_df)``, so its marginals are Student-t with the combined scale. With
    ``blendedness`` ``beta`` per source, ``flux_sys`` and ``stat_scale`` grow by
    ``flux_sys_blend * beta`` and ``stat_blend * beta``; with ``snr_power`` the fractional
    systematic scales as ``(nu / SNR_REF) ** snr_power``, ``nu`` the S/N of the source's
    band-summed flux (the mixture's mean over the first morphology's statistical errors).

    Parameters
    ----------
    mean, cov, chi2
        As :func:`linear_fluxes` returns them (with or without its leading blend axis ``G``;
        each blend gets its own draws).
    num_samples : int
    rng : numpy Generator
    flux_sys, power, df, stat_scale, tail, flux_sys_blend, stat_blend, snr_power, snr_max
        The error model, :class:`Systematic` (its defaults: the statistical errors alone).
    blendedness : array ([G,] S), optional
        Each source's blendedness (:func:`model_blendedness`); default 0.

    Returns
    -------
    dict: ``flux`` ([G,] num_samples, S, band), ``morph`` ([G,] num_samples) the morphology draw
    of each flux draw, ``inflation`` ([G,] S, band) = max(chi2, 1), ``cov`` ([G,] M, band, S,
    S): the inflated, scaled statistical covariance plus the systematic's scale squared on
    the diagonal (the Gaussian scale: with a Student-t tail the variance is ``df / (df - 2)``
    times larger on the tail's part).
    """
    model = Systematic(flux_sys, power, df, stat_scale, tail, flux_sys_blend,
                       stat_blend, snr_power, snr_max).check()
    batched = np.ndim(mean) == 4
    if not batched:
        mean, cov, chi2 = mean[None], cov[None], chi2[None]
    g, m, n_b, n_src = mean.shape
    n = int(num_samples)
    snr = None
    if model.snr_power:  # of the band-summed flux, with the first morphology's errors
        var = np.einsum("gbss->gs", cov[:, 0] * np.maximum(np.swapaxes(chi2, -1, -2),
                                                           1.0)[:, :, :, None])
        snr = mean.mean(1).sum(1) / np.sqrt(np.maximum(var, 1e-300))
    k_s, eps_s = model.factors(np.zeros((g, n_src)) if blendedness is None
                               else np.reshape(blendedness, (g, n_src)), snr)
    k_s, eps_s = k_s[:, None, :], eps_s[:, None, None, :]  # (G, 1, S), (G, 1, 1, S)
    infl = np.maximum(chi2, 1.0)
    sq = np.swapaxes(np.sqrt(infl), -1, -2) * k_s  # (G, B, S)
    cov_d = cov * sq[:, None, :, :, None] * sq[:, None, :, None, :]
    chol = psd_factor(cov_d)
    k = rng.integers(0, m, size=(g, n))
    eps = rng.standard_normal((g, n, n_b, n_src))
    rows = np.arange(g)[:, None]
    centre = mean.mean(1)[:, None]  # (G, 1, B, S): the mixture's mean
    # the closed-form spread, between the morphology draws and within each, scaled together
    err = (mean[rows, k] - centre) * k_s[:, None] + np.einsum("gnbst,gnbt->gnbs",
                                                                chol[rows, k], eps)
    sys_sd = (eps_s * np.clip(mean, 0.0, None)
              * np.swapaxes(infl, -1, -2)[:, None] ** (0.5 * power))  # (G, M, B, S)
    total = tail == "total"
    if np.any(eps_s > 0):  # scaled by the footprint misfit: a worse-fitting morphology, larger
        err = err + sys_sd[rows, k] * systematic_noise(rng, (g, n, 1, n_src),
                                                       np.inf if total else df)
        cov_d = cov_d + sys_sd[..., None] ** 2 * np.eye(n_src)
    if total and np.isfinite(df):  # one scale per source and draw: Student-t marginals
        err = err * np.sqrt(df / rng.chisquare(df, size=(g, n, 1, n_src)))
    f = centre + err
    out = {"flux": np.swapaxes(f, -1, -2), "morph": k, "inflation": infl, "cov": cov_d}
    return out if batched else {key: v[0] for key, v in out.items()}


def systematic_of(card: dict | None, n_morph: int, refined: bool = False) -> Systematic:
    """The calibrated error model (:class:`Systematic`) of an encoder card for a mixture of
    ``n_morph`` morphology draws (see :func:`flux_draws`).

    Looks up ``calibration.by_n_morph[str(n_morph)]`` (:class:`Systematic`'s fields by
    name; the nearest calibrated ``n_morph`` when that one is missing, ties
    to fewer draws), then the top-level ``calibration.flux_sys`` / ``power`` / ``df`` (fitted
    at ``calibration.n_morph``). ``refined``: the morphology draws are centred on a refined
    morphology (``ScenePosterior.amortized(refine=...)``), whose error is smaller; looks up
    ``calibration.by_n_morph_refined`` first. Missing fields take :class:`Systematic`'s
    defaults (``df`` null: Gaussian); ``Systematic()`` without a calibration. The entry for
    one morphology draw (q's mean) is fitted on the catalogue's own path
    (``calibrate_photometry.py --catalog``).
    """
    def nearest(table):
        by = {int(k): Systematic.from_card(v) for k, v in (table or {}).items()}
        return by[min(by, key=lambda k: (abs(k - int(n_morph)), k))] if by else None

    cal = (card or {}).get("calibration") or {}
    if refined and (hit := nearest(cal.get("by_n_morph_refined"))) is not None:
        return hit
    by = dict(cal.get("by_n_morph") or {})
    if "flux_sys" in cal:
        by.setdefault(str(cal.get("n_morph", n_morph)), cal)
    return nearest(by) or Systematic()


def local_templates(stamps: np.ndarray, positions: np.ndarray, psf: np.ndarray,
                    model_psf: np.ndarray, box: int | None = None):
    """Unit-flux images of single sources in local boxes of the scene, through its PSFs.

    The scene renderer's forward model (:func:`probdeblend.render.render`, one source per
    box): each model-frame stamp is shifted to its position (Fourier phase) and convolved with
    the difference kernel ``PSF_band / PSF_model``, on a box large enough that the kernel does
    not wrap.

    Parameters
    ----------
    stamps : array (n, band, N, N)
        Flux-normalised model-frame images (each band sums to 1).
    positions : array (n, 2)
        ``(x, y)`` pixel position of each source's centre in the scene.
    psf : array (band, k, k)
        The image of a unit-total-flux point source per band (``Scene.unit_flux_psf``), so
        that the templates' fluxes are total fluxes (each template then sums to the band's
        ``psf_flux_fraction``).
    model_psf : array (k', k')
        The prior's model PSF on the scene's grid.
    box : int, optional
        Edge ``L`` of the boxes in pixels (even, at least the stamp's). Default: the smallest
        even fast FFT length >= stamp + PSF size, on which the convolution does not wrap. A
        smaller box is faster but folds the light of the PSF's far wings beyond it back in
        from the opposite edge (the template keeps unit sum; <= ~0.2 % of the peak per pixel
        at 72 px for LSST stamps and PSFs).

    Returns
    -------
    templates : float32 array (n, band, L, L)
    origins : int array (n, 2)
        Scene ``(x, y)`` of each box's pixel ``[0, 0]``.
    """
    import torch

    from .render import difference_kernel_ft, fft_size, render

    st = torch.as_tensor(np.asarray(stamps, np.float32))
    n, nb, ns = st.shape[0], st.shape[1], st.shape[-1]
    k = max(np.asarray(psf).shape[-1], np.asarray(model_psf).shape[-1])
    size = fft_size(ns + k, even=True) if box is None else int(box)  # render(): even width
    if size < ns or size % 2:
        from .errors import ArgumentError

        raise ArgumentError("box", box, f"the box ({size} px) must be even and hold the "
                                        f"stamps ({ns} px); pass an even box >= {ns} or None")
    p0 = (size - ns) // 2
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    origins = np.floor(pos - (ns - 1) / 2.0).astype(np.int64) - p0  # box pixel [0, 0]
    kern = torch.as_tensor(difference_kernel_ft(psf, model_psf, (size, size)).astype(np.complex64))
    freqs = (torch.as_tensor(np.fft.fftfreq(size)[:, None].astype(np.float32)),
             torch.as_tensor(np.fft.rfftfreq(size)[None, :].astype(np.float32)))
    local = torch.as_tensor((pos - origins)[:, None].astype(np.float32))  # (n, 1, 2) in the box
    with torch.inference_mode():  # the scene renderer's forward model, one source per box
        out = render(st[:, None], torch.ones((n, 1, nb)), local, kern, freqs, (size, size),
                     torch)
    return out.numpy(), origins


def _support(templates: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes ``[lo, hi)`` (``(n, 2)`` each, ``(x, y)`` pixels of the template box) of
    the pixels where a template ``(n, band, L, L)`` exceeds ``fraction`` of its peak in any
    band; the whole box for a template without positive pixels."""
    m = np.asarray(templates).max(1)
    above = m > fraction * m.max((1, 2), keepdims=True)
    rows, cols = above.any(2), above.any(1)  # (n, L) along y, along x
    n, size = rows.shape

    def extent(a):
        first = np.where(a.any(1), a.argmax(1), 0)
        last = np.where(a.any(1), size - a[:, ::-1].argmax(1), size)
        return first, last

    (y0, y1), (x0, x1) = extent(rows), extent(cols)
    return np.stack([x0, y0], -1), np.stack([x1, y1], -1)


def model_blendedness(tmpl: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Blendedness of each source in its fitted model: ``1 - <m_s, m_s> / <m_s, M>``
    (Bosch et al. 2018), with ``m_s`` the source's model image summed over bands (fluxes
    clipped at 0) and ``M`` the sum of the blend's; 0 for an isolated source (or one with no
    positive flux), towards 1 for a source buried under its neighbours.

    Parameters
    ----------
    tmpl : array ([G,] S, band, y, x)
        Unit-flux templates of the blend's sources on one grid.
    flux : array ([G,] band, S)
        Their fluxes (e.g. :func:`linear_fluxes`' mean of one morphology).

    Returns
    -------
    array ([G,] S)
    """
    t = np.asarray(tmpl)
    f = np.clip(np.asarray(flux, np.float64), 0.0, None)
    m = np.einsum("...bs,...sbyx->...syx", f, t).reshape(*t.shape[:-3], -1)  # (..., S, P)
    own = np.einsum("...sp,...sp->...s", m, m)
    cross = np.einsum("...sp,...p->...s", m, m.sum(-2))
    return np.where(cross > 0, 1.0 - own / np.where(cross > 0, cross, 1.0), 0.0)


def add_box(target: np.ndarray, box: np.ndarray, origin) -> None:
    """Add ``box (..., L, L)`` (e.g. a :func:`local_templates` box) into ``target (..., ny,
    nx)`` with its pixel [0, 0] at ``origin = (x, y)`` of the target, clipped (in place)."""
    ny, nx = target.shape[-2:]
    size_y, size_x = box.shape[-2:]
    ox, oy = int(origin[0]), int(origin[1])
    ax, ay, bx, by = max(ox, 0), max(oy, 0), min(ox + size_x, nx), min(oy + size_y, ny)
    if bx > ax and by > ay:
        target[..., ay:by, ax:bx] += box[..., ay - oy:by - oy, ax - ox:bx - ox]


def group_photometry(templates: np.ndarray, origins: np.ndarray, image: np.ndarray,
                     weight: np.ndarray | None, groups, num_samples: int,
                     rng: np.random.Generator, systematic: Systematic | None = None,
                     redistribute: float | None = None,
                     variance: np.ndarray | None = None) -> dict:
    """Flux posterior draws of every source, solved jointly within each blend group.

    Parameters
    ----------
    templates, origins
        From :func:`local_templates` (one morphology per source).
    image, weight : array (band, ny, nx)
        The scene (or a cutout of it holding the sources' boxes, in the same coordinates),
        any float dtype (each group's box is copied to float64). ``weight`` None: give
        ``variance`` instead.
    groups : sequence of int arrays
        Indices of the sources of each blend group (every source in exactly one).
    num_samples : int
    rng : numpy Generator
    systematic : Systematic, optional
        The error model added to the statistical errors (:func:`flux_draws`; default none).
    redistribute : float, optional
        See :func:`linear_fluxes`.
    variance : array (band, ny, nx), optional
        Instead of ``weight``: the pixel variance (``inf`` = masked), inverted box by box, so
        that no image-size weight array is made (e.g. ``Scene.variance``).

    Returns
    -------
    dict: ``flux`` (n, num_samples, band), ``mean`` (n, band), ``sd`` (n, band) (the error
    model's Gaussian scale: the inflated, scaled statistical sd and the systematic's scale in
    quadrature), ``chi2`` (n, band) (the footprint's reduced chi^2, :func:`linear_fluxes`),
    ``blendedness`` (n,) (:func:`model_blendedness` of the fitted model; NaN: not
    measured).

    Notes
    -----
    Each group is solved on the union of its templates' supports (pixels above ``_SUPPORT``
    of the template's peak in some band): the pixels left out carry < 1e-4 of the peak's
    signal each, so the least-squares fit loses nothing measurable there (on a 2048^2 LSST
    field the fluxes moved by <= 1.2 % of their errors against the whole box, 99 % of them by
    < 5e-4), and the footprints of the chi^2 (5 %) and
    of the redistribution (0.3 %) lie inside. Groups with the same number of sources whose
    boxes round up to the same size (multiples
    of ``_BOX_STEP`` pixels) are solved together in batches (:func:`linear_fluxes` with its
    blend axis); the padding pixels carry zero weight, so each group's answer is that of its
    own box. A batch holds at most ``_BATCH_ELEMENTS`` template pixels (bounded memory).
    """
    if weight is None and variance is None:
        from .errors import ArgumentError

        raise ArgumentError("weight", weight, "give the inverse variance or, instead, "
                                              "variance=")
    n, nb = templates.shape[0], templates.shape[1]
    ny, nx = image.shape[-2:]
    flux = np.full((n, int(num_samples), nb), np.nan)
    mean = np.full((n, nb), np.nan)
    sd = np.full((n, nb), np.nan)
    chi2 = np.zeros((n, nb))
    blend = np.full(n, np.nan)
    lo, hi = _support(templates, _SUPPORT)  # (n, 2) box pixels of each template's support
    buckets: dict[tuple[int, int, int], list] = {}
    for members in groups:  # each group's box: its templates' supports, clipped to the image
        members = np.asarray(members, np.int64)
        a, b = origins[members] + lo[members], origins[members] + hi[members]
        x0, y0 = max(int(a[:, 0].min()), 0), max(int(a[:, 1].min()), 0)
        x1, y1 = min(int(b[:, 0].max()), nx), min(int(b[:, 1].max()), ny)
        if x1 <= x0 or y1 <= y0:  # every box outside the image: nothing measured (NaN)
            continue
        key = (len(members), -(-(y1 - y0) // _BOX_STEP) * _BOX_STEP,
               -(-(x1 - x0) // _BOX_STEP) * _BOX_STEP)
        buckets.setdefault(key, []).append((members, x0, y0, x1, y1))
    for (n_src, h, w), items in buckets.items():
        per = max(1, _BATCH_ELEMENTS // (n_src * nb * h * w))
        for i in range(0, len(items), per):
            batch = items[i:i + per]
            tm = np.zeros((len(batch), 1, n_src, nb, h, w))
            img = np.zeros((len(batch), nb, h, w))
            wt = np.zeros((len(batch), nb, h, w))
            for j, (members, x0, y0, x1, y1) in enumerate(batch):
                img[j, :, :y1 - y0, :x1 - x0] = image[:, y0:y1, x0:x1]
                if weight is not None:
                    wt[j, :, :y1 - y0, :x1 - x0] = weight[:, y0:y1, x0:x1]
                else:  # 1 / variance of the box; 0 where masked (inf) or not positive
                    v = np.asarray(variance[:, y0:y1, x0:x1], np.float64)
                    ok = np.isfinite(v) & (v > 0)
                    wt[j, :, :y1 - y0, :x1 - x0] = np.where(ok, 1.0 / np.where(ok, v, 1.0),
                                                            0.0)
                for k, (ox, oy) in enumerate(origins[members]):  # paste, clipped to the box
                    add_box(tm[j, 0, k, :, :y1 - y0, :x1 - x0], templates[members[k]],
                            (ox - x0, oy - y0))
            mu, cov, c2 = linear_fluxes(tm, img, wt, redistribute)
            beta = model_blendedness(tm[:, 0], mu[:, 0])  # (G, S)
            d = flux_draws(mu, cov, c2, num_samples, rng, *(systematic or Systematic()),
                           blendedness=beta)
            idx = np.concatenate([b[0] for b in batch])
            flux[idx] = np.swapaxes(d["flux"], 1, 2).reshape(-1, int(num_samples), nb)
            mean[idx] = np.swapaxes(mu[:, 0], 1, 2).reshape(-1, nb)
            var = np.einsum("gbss->gsb", d["cov"][:, 0])
            sd[idx] = np.sqrt(var).reshape(-1, nb)
            chi2[idx] = c2.reshape(-1, nb)
            blend[idx] = beta.reshape(-1)
    return {"flux": flux, "mean": mean, "sd": sd, "chi2": chi2, "blendedness": blend}
