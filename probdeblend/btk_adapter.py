"""probdeblend inside BlendingToolKit (BTK, LSST DESC's deblender evaluation framework).

* :class:`ProbdeblendDeblender` is a ``btk.deblend.Deblender``. Its ``batch_call`` encodes a
  whole ``BlendBatch`` in one batched pass: the blends are laid side by side in one mosaic
  :class:`~probdeblend.Scene` separated by masked gutters (variance ``inf``) at least half an
  encoder stamp wide, so no cutout sees two blends, and :func:`probdeblend.deblend` runs once
  on the mosaic (detection, blend groups, amortized posteriors). Each blend gets a
  ``btk.blend_batch.DeblendExample`` with the catalogue columns BTK's matchers use (``x_peak``,
  ``y_peak`` in the blend's 0-based pixels, ``ra``, ``dec`` in arcsec in the blend's WCS), the
  posterior summaries of :mod:`probdeblend.catalog` (``flux_<b>``, ``flux_<b>_err``, ``e1``, ...)
  as extra columns and in ``extra_data``, and, with ``render=True``, one deblended image per
  source (the q-mean galaxy rendered with the forward model, :mod:`probdeblend.render`).
* :func:`catsim_catalog` writes galaxies of :class:`probdeblend.simulate.GalaxyPopulation` in
  BTK's CatSim schema (BTK's wheel ships no input catalogue), so BTK's own generator
  (``btk.draw_blends.CatsimGenerator``) can draw blends of the same population.

BTK is an optional dependency: ``pip install probdeblend[btk]``. (blending-toolkit 1.0.9 pins
``astropy<7``; it runs with astropy 8 here, so it may be installed with ``--no-deps`` plus
``fast3tree`` and ``scikit-image``.)
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

__all__ = ["ProbdeblendDeblender", "CatsimGenerator", "catsim_catalog",  # noqa: F822
           "blend_batch_scenes"]


def _btk():
    try:
        import btk  # noqa: F401
        import btk.blend_batch
        import btk.deblend
        import btk.draw_blends
    except ImportError as err:  # pragma: no cover - exercised without btk
        raise ImportError("the BTK adapter needs blending-toolkit: pip install "
                          "'probdeblend[btk]'") from err
    return btk


def catsim_catalog(n: int = 2000, seed: int = 0, population=None, survey: str = "lsst") -> Table:
    """``n`` galaxies of a :class:`~probdeblend.simulate.GalaxyPopulation` in BTK's CatSim schema.

    Columns: ``galtileid``, ``ra``, ``dec`` (0; BTK's sampling functions place the galaxies),
    ``redshift``, ``<b>_ab`` for ugrizy (AB magnitudes from the population's per-band fluxes),
    ``fluxnorm_bulge``, ``fluxnorm_disk``, ``fluxnorm_agn`` (bulge / disk fractions of the
    reference band; CatSim uses one fraction for all bands), ``a_d``, ``b_d``, ``a_b``, ``b_b``
    (semi-major / minor half-light radii in arcsec, ``sqrt(a b)`` = the population's
    half-light radius, ``b / a`` from the intrinsic ellipticity ``|g|``), ``pa_disk``,
    ``pa_bulge`` (degrees, ``0.5 atan2(g2, g1)``) and the truth ``g1_int``, ``g2_int``.
    """
    from .simulate import GalaxyPopulation
    from .survey import get_survey

    population = population or GalaxyPopulation()
    surv = get_survey(survey)
    rng = np.random.default_rng(seed)
    pop = population.sample(int(n), surv, rng)
    t = Table()
    t["galtileid"] = np.arange(len(pop), dtype=np.int64)
    t["ra"] = np.zeros(len(pop))
    t["dec"] = np.zeros(len(pop))
    t["redshift"] = np.asarray(pop["z"])
    for band in surv:
        flux = np.clip(np.asarray(pop[f"flux_{band.name}"], dtype=np.float64), 1e-30, None)
        t[f"{band.name}_ab"] = np.asarray(band.flux_to_mag(flux), dtype=np.float64)
    ref = population.ref_band
    fb = np.asarray(pop[f"flux_bulge_{ref}"]) / np.asarray(pop[f"flux_{ref}"])
    t["fluxnorm_bulge"] = fb
    t["fluxnorm_disk"] = 1.0 - fb
    t["fluxnorm_agn"] = np.zeros(len(pop))
    g1, g2 = np.asarray(pop["g1_int"]), np.asarray(pop["g2_int"])
    gmod = np.hypot(g1, g2)
    q = (1 - gmod) / (1 + gmod)
    for comp, hlr in (("d", pop["hlr_disk"]), ("b", pop["hlr_bulge"])):
        hlr = np.asarray(hlr)
        t[f"a_{comp}"] = hlr / np.sqrt(q)
        t[f"b_{comp}"] = hlr * np.sqrt(q)
    pa = np.degrees(0.5 * np.arctan2(g2, g1))
    t["pa_disk"] = pa
    t["pa_bulge"] = pa
    t["g1_int"], t["g2_int"] = g1, g2
    t.meta["source"] = "probdeblend.simulate.GalaxyPopulation (see docs/simulation.md)"
    return t


def _psf_images(blend_batch, size: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """Unit-sum ``(band, size, size)`` PSF images of a batch and the fraction of each PSF's
    light they hold (:attr:`probdeblend.Scene.psf_flux_fraction`): of the unit-flux GalSim
    PSF, or of the stored image when the batch holds images (``BlendBatch.load``)."""
    scale = blend_batch.survey.pixel_scale.to_value("arcsec")
    out, frac = [], []
    for psf in blend_batch.psf:
        if hasattr(psf, "drawImage"):
            img = psf.drawImage(nx=size, ny=size, scale=scale).array.astype(np.float64)
            frac.append(min(float(img.sum()), 1.0))
        else:  # galsim.Image (BlendBatch.load)
            full = np.asarray(psf.array, np.float64)
            c, h = full.shape[0] // 2, size // 2
            img = full[c - h:c + h + 1, c - h:c + h + 1]
            frac.append(float(img.sum() / full.sum()))
        out.append(img / img.sum())
    return np.asarray(out, dtype=np.float32), np.asarray(frac)


def _sky_levels(blend_batch) -> np.ndarray:
    from surveycodex.utilities import mean_sky_level

    surv = blend_batch.survey
    return np.array([mean_sky_level(surv, surv.get_filter(b)).to_value("electron")
                     for b in surv.available_filters])


def blend_batch_scenes(blend_batch, gutter: int = 26):
    """The blends of a BTK ``BlendBatch`` as one mosaic :class:`~probdeblend.Scene`.

    Blend ``i`` occupies ``[gutter + i * (n + gutter), ...)`` along x of a strip of height
    ``n + 2 gutter``; gutters are masked. The variance is BTK's noise model, ``sky + max(image,
    0)`` (Poisson, electrons). Returns ``(scene, x_offsets, y_offset)``.
    """
    from .scene import Scene

    images = np.asarray(blend_batch.blend_images, dtype=np.float32)  # (N, B, n, n)
    nb, bands, n = images.shape[0], images.shape[1], images.shape[-1]
    sky = _sky_levels(blend_batch).astype(np.float32)
    width = gutter + nb * (n + gutter)
    mosaic = np.zeros((bands, n + 2 * gutter, width), dtype=np.float32)
    var = np.full_like(mosaic, np.inf)
    x0 = gutter + np.arange(nb) * (n + gutter)
    for i in range(nb):
        sl = (slice(None), slice(gutter, gutter + n), slice(x0[i], x0[i] + n))
        mosaic[sl] = images[i]
        var[sl] = sky[:, None, None] + np.clip(images[i], 0, None)
    names = tuple(blend_batch.survey.available_filters)
    psf, psf_frac = _psf_images(blend_batch)
    scene = Scene(mosaic, var, psf, names, blend_batch.survey.pixel_scale.to_value("arcsec"),
                  psf_flux_fraction=psf_frac)
    return scene, x0, gutter


def _make_class():
    btk = _btk()

    class ProbdeblendDeblender(btk.deblend.Deblender):
        """probdeblend as a BTK deblender (amortized posteriors, batched over the batch).

        Parameters
        ----------
        max_n_sources : int
            BTK's maximum number of sources per blend; extra detections (lowest detection S/N
            first) are dropped and counted in ``extra_data["n_dropped"]``.
        prior : str
            Prior (and its amortized encoder) of :func:`probdeblend.deblend`.
        num_samples : int
            Posterior draws per source.
        seed : int
        render : bool
            Return deblended images (one per source, q-mean model, all bands).
        use_truth_positions : bool
            Deblend at the true positions of BTK's catalogue (measurement only, no detection).
        detect_kwargs : dict, optional
            Passed to :func:`probdeblend.detection.detect_sources`.
        """

        def __init__(self, max_n_sources: int, prior: str = "lsst-vae", num_samples: int = 200,
                     seed: int = 0, render: bool = True, use_truth_positions: bool = False,
                     detect_kwargs: dict | None = None) -> None:
            super().__init__(max_n_sources)
            self.prior, self.num_samples, self.seed = prior, int(num_samples), int(seed)
            self.render = bool(render)
            self.use_truth_positions = bool(use_truth_positions)
            self.detect_kwargs = dict(detect_kwargs or {})

        def deblend(self, ii, blend_batch):
            """One blend (BTK's per-example interface); :meth:`batch_call` is the fast path."""
            return self._run(blend_batch, [ii])[0]

        def batch_call(self, blend_batch, njobs: int = 1, **kwargs):
            """Deblend the whole batch with one encoder pass (``njobs`` is ignored)."""
            examples = self._run(blend_batch, list(range(blend_batch.batch_size)))
            n_bands = len(blend_batch.survey.available_filters)
            deblended = (np.array([e.deblended_images for e in examples])
                         if self.render else None)
            return btk.blend_batch.DeblendBatch(
                blend_batch.batch_size, self.max_n_sources, [e.catalog for e in examples],
                n_bands if self.render else None, blend_batch.image_size, None, deblended,
                [e.extra_data for e in examples])

        # -----------------------------------------------------------------------------------
        def _run(self, blend_batch, indices):
            from .deblend import deblend

            scene, x0, y0 = blend_batch_scenes(blend_batch)
            n = blend_batch.image_size
            if self.use_truth_positions:
                pos = []
                for i in indices:
                    c = blend_batch.catalog_list[i]
                    pos += [(x + x0[i], y + y0) for x, y in zip(c["x_peak"], c["y_peak"],
                                                                 strict=True)]
                scene = scene.with_positions(np.asarray(pos, dtype=np.float64).reshape(-1, 2))
            cat = deblend(scene, num_samples=self.num_samples, seed=self.seed,
                          prior=self.prior, detect_kwargs=self.detect_kwargs)
            xi = np.asarray(cat["x_init"])
            blend_of = np.searchsorted(x0, xi, side="right") - 1  # gutters are masked
            models = self._render(scene, cat, x0, y0, n) if self.render else None
            wcs = blend_batch.wcs
            out = []
            bands = list(blend_batch.survey.available_filters)
            for i in indices:
                rows = np.flatnonzero(blend_of == i)
                rows = rows[np.argsort(-np.nan_to_num(np.asarray(cat["snr_det"])[rows],
                                                      nan=np.inf), kind="stable")]
                dropped = max(len(rows) - self.max_n_sources, 0)
                rows = rows[: self.max_n_sources]
                sub = cat[rows]
                t = Table()
                x = np.asarray(sub["x"]) - x0[i]
                y = np.asarray(sub["y"]) - y0
                ra, dec = wcs.pixel_to_world_values(x, y) if len(x) else (np.zeros(0),
                                                                          np.zeros(0))
                t["ra"] = (((np.asarray(ra) + 180.0) % 360.0) - 180.0) * 3600.0
                t["dec"] = np.asarray(dec) * 3600.0
                t["x_peak"], t["y_peak"] = x, y
                for c in sub.colnames:
                    if c not in ("x", "y", "ra", "dec") and c not in t.colnames:
                        t[c] = sub[c]
                deb = None
                if self.render:
                    deb = np.zeros((self.max_n_sources, len(bands), n, n), dtype=np.float32)
                    for k, r in enumerate(rows):
                        deb[k] = models[r]
                extra = {"n_dropped": dropped, "method": "probdeblend.deblend (amortized)",
                         "posterior": {c: np.asarray(sub[c]) for c in sub.colnames
                                       if c.startswith(("flux_", "e1", "e2"))}}
                out.append(btk.blend_batch.DeblendExample(
                    self.max_n_sources, t, len(bands) if self.render else None, n, None, deb,
                    extra))
            return out

        def _render(self, scene, cat, x0, y0, n):
            """q-mean model image (band, n, n) of every catalogue row in its blend's frame.

            One encoder pass for all sources; each source is rendered alone with the forward
            model (:class:`probdeblend.render.SceneRenderer`) on its blend's ``n x n`` grid."""
            import torch

            from .deblend import _encoder, _resolve_prior
            from .render import SceneRenderer

            prior = _resolve_prior(self.prior)
            post = _encoder(prior)
            pos = np.stack([np.asarray(cat["x_init"]), np.asarray(cat["y_init"])], -1)
            if len(pos) == 0:
                return np.zeros((0, scene.n_bands, n, n), np.float32)
            q = post.predict(scene, pos)
            band_idx = [list(post.bands).index(b) for b in scene.bands]
            k = scene.psf.shape[-1]
            rend = SceneRenderer(scene.unit_flux_psf, (n, n), prior.frame.psf_image(k),
                                 prior.frame.stamp_size, scene.bands)
            blend_of = np.searchsorted(x0, pos[:, 0], side="right") - 1
            xy = np.asarray(q["positions"], np.float64) - np.stack(
                [x0[blend_of], np.full(len(pos), y0)], -1)
            with torch.inference_mode():
                z = torch.as_tensor(np.asarray(q["z_loc"], np.float32))
                stamps = prior.decode(z)[:, band_idx]  # (S, B, n, n), unit-sum bands
                flux = torch.as_tensor(np.exp(q["log_flux_loc"][:, band_idx]).astype(np.float32))
                xy = torch.as_tensor(xy.astype(np.float32))
                imgs = rend(stamps[:, None], flux[:, None], xy[:, None])  # (S, B, n, n)
            return np.clip(np.asarray(imgs, dtype=np.float32), 0, None)  # FFT ringing < 0

    return ProbdeblendDeblender


class _IntSeed:
    """SeedSequence whose ``generate_state(1)`` is a Python int (GalSim >= 2.6 refuses arrays)."""

    def __init__(self, seedseq):
        self.seedseq = seedseq

    def generate_state(self, n_words, dtype=np.uint32):
        state = self.seedseq.generate_state(n_words, dtype)
        return int(state[0]) if n_words == 1 else state


def _make_generator():
    btk = _btk()

    class CatsimGenerator(btk.draw_blends.CatsimGenerator):
        """``btk.draw_blends.CatsimGenerator`` that runs with GalSim >= 2.6.

        blending-toolkit 1.0.9 seeds ``galsim.BaseDeviate`` with a numpy array
        (``SeedSequence.generate_state(1)``), which GalSim 2.6+ rejects; this passes the same
        32-bit state as an int, so images are otherwise BTK's own.
        """

        def render_blend(self, blend_catalog, psf, filt, survey, seedseq_blend):
            return super().render_blend(blend_catalog, psf, filt, survey,
                                        _IntSeed(seedseq_blend))

    return CatsimGenerator


def __getattr__(name):
    if name in ("ProbdeblendDeblender", "CatsimGenerator"):
        cls = _make_class() if name == "ProbdeblendDeblender" else _make_generator()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'probdeblend.btk_adapter' has no attribute {name!r}")

