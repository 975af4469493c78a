"""``probdeblend.deblend``: a whole image in, a catalogue with posterior summaries out.

Pipeline (see ``docs/survey_scale.md``):

1. **Sources.** ``scene.positions`` if given, else
   :func:`probdeblend.detection.detect_sources` on the whole image: PSF-matched-filtered
   multi-band S/N map, sep footprints, merged peaks split with a lowered-Gaussian test; then a
   **residual pass** (``residual_pass=True``): every detected source's amortized q-mean galaxy
   is rendered with the forward model, the model is subtracted and ``detect_sources`` runs on
   the residual at ``residual_threshold`` (10) sigma; new sources farther than 3 px from the
   known ones whose flux S/N, solved jointly with their neighbours, reaches
   ``residual_min_snr`` (7) are added (``det_pass = 1``): galaxies hidden under brighter
   neighbours.
2. **Blend groups.** Sources that may interact are grouped so that each source is owned by
   exactly one group and reported once:

   * ``grouping="footprint"`` (default): connected components of the detection footprints
     (sep's segmentation of the matched-filtered S/N map at ``threshold``) *dilated* by
     ``dilate`` pixels. Two sources share a
     group when their isophotal footprints touch or come within ``2 * dilate`` pixels. This is
     the choice of SExtractor / the LSST pipelines ("parent footprints"): it adapts to the
     sizes of the galaxies (a big galaxy links its distant neighbours, two small ones far apart
     stay separate) and costs one ``scipy.ndimage.label``. Input positions that fall outside
     every footprint become groups of their own.
   * ``grouping="linkage"``: friends-of-friends with linking length ``link_length`` pixels
     (default 2.5 arcsec): cheap and size-blind; used when no footprints are wanted.

3. **Sub-scenes.** Each group is cut from the image with a ``margin`` (default half the
   amortized encoder's stamp plus 2 pixels) around its footprint: enough for every cutout the
   encoder takes and for per-group refinement. For refinement (``method="fit"``) the pixels of
   *other* groups' footprints inside the sub-scene are masked (variance ``inf``), so a
   neighbour owned by another group neither biases the fit nor is reported twice.
4. **Amortized inference batched across the image.** Groups are taken in order and packed
   into chunks of about ``chunk_size`` sources; each chunk is encoded in one batched pass by
   :func:`_amortized_catalog_draws` on the chunk's sub-image. Memory is bounded by the chunk
   (a strip of the image), never by the image; a group is never split across chunks.
5. **Refinement** (``method="fit"``): :func:`probdeblend.fit` on each group's sub-scene with
   ``fit_method`` (the method ladder: ``"amortized"`` importance sampling with k-hat,
   ``"svi"``, ``"nuts"``, ``"auto"``). A group whose fit fails keeps its amortized row with
   ``flag_failed`` and the reason.
6. **Catalogue.** :mod:`probdeblend.catalog` (schema, units, FITS / Parquet writers).

Everything random is seeded from ``seed``: the same image and seed give the same catalogue.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, ProbdeblendError, SceneError
from .scene import Scene

__all__ = ["deblend", "blend_groups", "BlendGroup", "METHODS", "GROUPINGS"]

METHODS = ("amortized", "fit")
GROUPINGS = ("footprint", "linkage")
#: default linking length (arcsec) of ``grouping="linkage"``
LINK_LENGTH_ARCSEC = 2.5
#: pixels added to the prior's stamp for the catalogue's boxes (rounded up to an even fast FFT
#: length: 72 px for 48 px stamps). Against the exact stamp + PSF box (90 px), whose far PSF
#: wings a 72 px render folds back in (<= ~0.15 % of a template's flux, <= 0.2 % of its peak
#: per pixel on LSST PSFs), the fluxes agree to 1e-7 relative and the residual pass's model
#: image to < 0.3 sigma (the same residual detections on a 2048^2 field: 168 with the
#: image-size FFT model, 169 with exact boxes); renders and group solves cost ~0.6x.
CATALOG_BOX_MARGIN = 24
#: most bytes :func:`deblend` keeps of first-pass templates between the residual pass and the
#: photometry (float16, 62 KB per LSST source: ~17,000 sources); beyond it they are rendered
#: again (same catalogue, ~30 % slower).
TEMPLATE_CACHE_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------
# blend groups
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlendGroup:
    """A set of sources deblended together.

    Attributes
    ----------
    id : int
        Group id (0-based, in order of the groups' first pixel row).
    members : ndarray of int
        Indices of the sources (into the positions array) owned by the group.
    bbox : (y0, y1, x0, x1)
        Pixel box of the group's sub-scene in the image (margin included, clipped).
    """

    id: int
    members: np.ndarray
    bbox: tuple[int, int, int, int]

    @property
    def size(self) -> int:
        return len(self.members)


def _box(y0, y1, x0, x1, margin, shape):
    ny, nx = shape
    return (max(int(y0) - margin, 0), min(int(y1) + margin, ny),
            max(int(x0) - margin, 0), min(int(x1) + margin, nx))


def blend_groups(positions: np.ndarray, shape: tuple[int, int], segmap: np.ndarray | None = None,
                 grouping: str = "footprint", dilate: int = 2, link_length: float = 12.5,
                 margin: int = 26) -> tuple[list[BlendGroup], np.ndarray]:
    """Partition sources into blend groups (see the module notes).

    Parameters
    ----------
    positions : array (n, 2)
        ``(x, y)`` pixels.
    shape : (ny, nx)
        Image shape.
    segmap : int array (ny, nx), optional
        Detection footprints (non-zero = source pixels); required for ``"footprint"``.
    grouping : {"footprint", "linkage"}
    dilate : int
        Footprint dilation (pixels) before connected components.
    link_length : float
        Friends-of-friends linking length (pixels) for ``"linkage"``.
    margin : int
        Pixels added around each group's footprint / positions for its sub-scene.

    Returns
    -------
    groups : list of BlendGroup
        Every source in exactly one group.
    labels : int array (ny, nx)
        Group id + 1 of each footprint pixel (0 elsewhere); zeros for ``"linkage"``.
    """
    from scipy import ndimage

    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    ny, nx = shape
    ix = np.clip(np.floor(pos[:, 0] + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(pos[:, 1] + 0.5).astype(int), 0, ny - 1)
    groups: list[BlendGroup] = []
    if grouping == "footprint":
        if segmap is None:
            raise ArgumentError("segmap", None, "grouping='footprint' needs a segmentation map")
        mask = np.asarray(segmap) > 0
        if dilate > 0:
            yy, xx = np.mgrid[-dilate:dilate + 1, -dilate:dilate + 1]
            mask = ndimage.binary_dilation(mask, structure=(xx**2 + yy**2) <= dilate**2)
        lab, n_lab = ndimage.label(mask, structure=np.ones((3, 3), bool))
        src_lab = lab[iy, ix]
        boxes = ndimage.find_objects(lab)
        # ids in order of first pixel row; sources outside every footprint are singletons
        members: dict[int, list[int]] = {}
        for s in np.argsort(src_lab, kind="stable"):
            members.setdefault(int(src_lab[s]), []).append(int(s))
        out_lab = np.zeros(n_lab + 1, dtype=np.int32)
        items: list[tuple[tuple[int, int], np.ndarray, tuple]] = []
        for lab_id, mem in members.items():
            if lab_id == 0:
                continue
            sl = boxes[lab_id - 1]
            p = pos[mem]
            y0 = min(sl[0].start, int(np.floor(p[:, 1].min())))
            y1 = max(sl[0].stop, int(np.ceil(p[:, 1].max())) + 1)
            x0 = min(sl[1].start, int(np.floor(p[:, 0].min())))
            x1 = max(sl[1].stop, int(np.ceil(p[:, 0].max())) + 1)
            items.append(((y0, x0), np.asarray(mem), (y0, y1, x0, x1), lab_id))
        for s in members.get(0, []):
            y, x = iy[s], ix[s]
            items.append(((y, x), np.asarray([s]), (y, y + 1, x, x + 1), 0))
        items.sort(key=lambda it: it[0])
        for gid, (_, mem, (y0, y1, x0, x1), lab_id) in enumerate(items):
            groups.append(BlendGroup(gid, mem, _box(y0, y1, x0, x1, margin, shape)))
            if lab_id:
                out_lab[lab_id] = gid + 1
        return groups, out_lab[lab]
    if grouping == "linkage":
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        if n == 0:
            return [], np.zeros(shape, np.int32)
        pairs = cKDTree(pos).query_pairs(float(link_length), output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        items = []
        for c in np.unique(comp):
            mem = np.flatnonzero(comp == c)
            p = pos[mem]
            y0, y1 = int(np.floor(p[:, 1].min())), int(np.ceil(p[:, 1].max())) + 1
            x0, x1 = int(np.floor(p[:, 0].min())), int(np.ceil(p[:, 0].max())) + 1
            items.append(((y0, x0), mem, (y0, y1, x0, x1)))
        items.sort(key=lambda it: it[0])
        groups = [BlendGroup(g, mem, _box(*b, margin, shape))
                  for g, (_, mem, b) in enumerate(items)]
        return groups, np.zeros(shape, np.int32)
    raise ArgumentError("grouping", grouping, f"must be one of {GROUPINGS}")


# ----------------------------------------------------------------------------------------------
# sub-scenes
# ----------------------------------------------------------------------------------------------
def _sub_scene(scene: Scene, bbox, positions=None, mask_labels=None, own_label=None) -> Scene:
    """The part ``bbox = (y0, y1, x0, x1)`` of ``scene``; positions shifted to its pixels.

    With ``mask_labels`` (group label map of the whole image), pixels of other groups'
    footprints are masked (variance inf)."""
    y0, y1, x0, x1 = bbox
    var = np.asarray(scene.variance[:, y0:y1, x0:x1])
    if mask_labels is not None:
        lab = mask_labels[y0:y1, x0:x1]
        other = (lab > 0) & (lab != own_label)
        if other.any():
            var = np.where(other[None], np.float32(np.inf), var)
    wcs = scene.wcs
    if wcs is not None:
        wcs = wcs[y0:y1, x0:x1]
    pos = None
    if positions is not None:
        pos = np.asarray(positions, dtype=np.float64) - np.array([x0, y0], dtype=np.float64)
    return Scene(scene.image[:, y0:y1, x0:x1], var, scene.psf, scene.bands, scene.pixel_scale,
                 positions=pos, wcs=wcs, units=scene.units,
                 psf_flux_fraction=scene.psf_flux_fraction)


# ----------------------------------------------------------------------------------------------
# the amortized posterior of a batch of sources (ONE place: the fast-posterior work replaces it)
# ----------------------------------------------------------------------------------------------
_AMORTIZED: dict = {}
_PRIORS: dict = {}


def _resolve_prior(prior):
    """A loaded prior from a shipped name / path (cached per process), or ``prior`` itself."""
    if not isinstance(prior, (str, Path)):
        return prior
    key = str(prior)
    if key not in _PRIORS:
        from .priors.io import load_prior

        _PRIORS[key] = load_prior(key)
    return _PRIORS[key]


def _encoder(prior):
    from .amortized import AmortizedPosterior

    key = prior.name
    if key not in _AMORTIZED:
        _AMORTIZED[key] = AmortizedPosterior.for_prior(prior)
    return _AMORTIZED[key]


def _amortized_catalog_draws(scene: Scene, positions: np.ndarray, prior, num_samples: int,
                             seed: int, groups=None, photometry: bool = True,
                             q=None, templates=None, systematic=None) -> dict[str, Any]:
    """Posterior draws of every source at ``positions`` of ``scene``, in one batched pass.

    This is the single entry point of the catalogue to per-source inference; the rest of
    :func:`deblend` only consumes its output.

    The shipped amortized encoder ``<prior>-amortized`` (trained by neural posterior
    estimation, :mod:`probdeblend.amortized.npe`) gives each source a joint low-rank Gaussian q
    over latent, log-flux, offset and ellipticity (:class:`~probdeblend.amortized.q.
    AmortizedQ`); the catalogue's draws are q's own draws (``e_draws_from = "q"``), no decode
    per draw. For an encoder without a shape head, e of the decoded q-mean latent is given to
    every draw (``e_draws_from = "q_mean"``, zero width, flagged).

    Fluxes (``photometry=True``, default): the closed-form flux posterior given q's mean
    morphology (:mod:`probdeblend.photometry`): every source's q-mean galaxy is decoded once
    and rendered through the scene's PSFs in a local box, and the fluxes of each blend group
    are solved jointly, with the encoder's calibrated systematic for one morphology draw
    (``systematic_of(card, 1)``) unless ``systematic`` gives another
    (:class:`probdeblend.photometry.Systematic`). Flux draws can be <= 0.
    ``photometry=False``: q's own log-normal flux draws.

    Parameters
    ----------
    scene : Scene
        Holds the prior's bands; any size (only cutouts around ``positions`` are read).
    positions : array (n, 2)
        ``(x, y)`` pixels in ``scene``.
    prior : LearnedPrior
    num_samples : int
        Draws per source.
    seed : int
    groups : sequence of int arrays, optional
        Blend groups (indices into ``positions``) whose fluxes are solved jointly; default:
        friends-of-friends within ``LINK_LENGTH_ARCSEC`` (deblend's ``"linkage"`` groups).
    photometry : bool
        See above.
    q : AmortizedQ, optional
        The encoder's q of these sources in ``scene``'s coordinates, when already computed
        (the residual pass encodes every first-pass source; :func:`deblend` reuses it).
    templates : (array (n, band, L, L), int array (n, 2)), optional
        The sources' q-mean templates and box origins in ``scene``'s pixels
        (:func:`_q_mean_templates`), when already rendered (the residual pass renders every
        first-pass source's); default: rendered here.

    Returns
    -------
    dict
        ``flux`` ``(n, S, B)`` (scene units, bands in ``scene.bands`` order), ``e1``, ``e2``,
        ``x``, ``y`` ``(n, S)`` (pixels of ``scene``), ``e_draws_from`` (str), ``method``
        (str), ``pareto_k`` ``(n,)`` (NaN: not computed), ``blendedness`` ``(n,)`` (of the
        photometry's q-mean model, :func:`probdeblend.photometry.model_blendedness`) and
        ``chi2`` ``(n, B)`` (its footprint reduced chi^2 per band); NaN without photometry.
    """
    import torch

    from .measure import moments, shear_from_moments

    post = _encoder(prior)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n, S = len(pos), int(num_samples)
    B = scene.n_bands
    if n == 0:
        z = np.zeros((0, S))
        return {"flux": np.zeros((0, S, B)), "e1": z, "e2": z, "x": z, "y": z,
                "e_draws_from": "q_mean", "method": "amortized", "pareto_k": np.zeros(0),
                "blendedness": np.zeros(0), "chi2": np.zeros((0, B))}
    q = post.predict_q(scene, pos) if q is None else q
    rng = np.random.default_rng(seed)
    # q's own joint draws of what the catalogue reports, (S, n, width) each; no decode
    wanted = ("offset", "e") if photometry else ("offset", "e", "log_flux")
    d = q.sample(S, rng, groups=[g for g in wanted if g in q.groups])
    # flux: q's bands are the encoder's; put them in the scene's band order
    band_idx = _band_idx(post, scene.bands)
    if photometry:
        ph = _catalog_photometry(scene, q, prior, post, band_idx, S, rng, groups, templates,
                                 systematic)
        flux, blend, chi2 = ph["flux"], ph["blendedness"], ph["chi2"]
    else:
        flux = np.exp(np.swapaxes(d["log_flux"], 0, 1))[..., band_idx]
        blend, chi2 = np.full(n, np.nan), np.full((n, B), np.nan)
    xy = np.swapaxes(d["position"], 0, 1)
    if "e" in d:  # the encoder's shape head: e draws from q's joint Gaussian
        e = np.swapaxes(d["e"], 0, 1)
        return {"flux": flux, "e1": e[..., 0], "e2": e[..., 1], "x": xy[..., 0],
                "y": xy[..., 1], "e_draws_from": "q", "method": "amortized",
                "pareto_k": np.full(n, np.nan), "blendedness": blend, "chi2": chi2}
    # an encoder without a shape head: e of the decoded q-mean latent (zero-width draws)
    frame = prior.frame
    psf_sigma = frame.psf_fwhm / frame.pixel_scale / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    e1 = np.empty(n)
    e2 = np.empty(n)
    z_loc = q.mean("z")
    with torch.inference_mode():
        for i in range(0, n, 256):
            z = torch.as_tensor(np.asarray(z_loc[i:i + 256], np.float32))
            stamps = prior.decode(z).numpy().mean(-3)  # mean of unit-sum bands
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = moments(stamps, weight_sigma="adaptive")
            q11 = np.asarray(m.Q11) - psf_sigma**2
            q22 = np.asarray(m.Q22) - psf_sigma**2
            bad = ~((q11 > 0) & (q22 > 0) & (q11 * q22 > np.asarray(m.Q12) ** 2))
            g1, g2 = shear_from_moments(np.where(bad, 1.0, q11), np.where(bad, 1.0, q22),
                                        np.where(bad, 0.0, np.asarray(m.Q12)))
            e1[i:i + 256] = np.where(bad, np.nan, g1)
            e2[i:i + 256] = np.where(bad, np.nan, g2)
    return {
        "flux": flux,
        "e1": np.repeat(e1[:, None], S, 1),
        "e2": np.repeat(e2[:, None], S, 1),
        "x": xy[..., 0],
        "y": xy[..., 1],
        "e_draws_from": "q_mean",
        "method": "amortized",
        "pareto_k": np.full(n, np.nan),
        "blendedness": blend,
        "chi2": chi2,
    }


def _band_idx(post, bands) -> list[int]:
    """Index into the encoder's bands (``post.bands``) of each of ``bands``."""
    return [list(post.bands).index(b) for b in bands]


def _catalog_box(prior) -> int:
    """Edge (pixels) of the catalogue's template boxes: the prior's stamp plus
    ``CATALOG_BOX_MARGIN``, rounded up to an even fast FFT length."""
    from .render import fft_size

    return fft_size(prior.frame.stamp_size + CATALOG_BOX_MARGIN, even=True)


def _q_mean_templates(scene: Scene, q, prior, band_idx,
                      model: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-flux templates of every source of ``q`` at q's mean morphology and position, in
    local boxes of ``scene`` of the stamp + ``CATALOG_BOX_MARGIN`` pixels
    (:func:`probdeblend.photometry.local_templates`), decoded and rendered 256 sources at a
    time. With ``model`` (band, ny, nx), q's mean fluxes times the templates are also added
    into it (the residual pass's model image). Returns ``(templates (n, band, L, L) float32,
    origins (n, 2))`` (``scene``'s pixels)."""
    from .photometry import add_box, local_templates

    z = np.asarray(q.mean("z"), np.float32)
    pos = q.centres + q.mean("offset")
    mpsf = prior.frame.psf_image(scene.psf.shape[-1])
    box = _catalog_box(prior)
    tmpl = np.empty((len(z), len(band_idx), box, box), np.float32)
    origins = np.empty((len(z), 2), np.int64)
    flux = None if model is None else np.exp(q.mean("log_flux")[:, band_idx]).astype(
        np.float32)
    for i in range(0, len(z), 256):  # bounded work arrays: one batch of stamps at a time
        st = prior.decode_numpy(z[i:i + 256])[:, band_idx]
        t, o = local_templates(st, pos[i:i + 256], scene.unit_flux_psf, mpsf, box=box)
        tmpl[i:i + 256], origins[i:i + 256] = t, o
        if model is not None:
            for j in range(len(t)):
                add_box(model, t[j] * flux[i + j, :, None, None], o[j])
    return tmpl, origins


class _TemplateCache:
    """The residual pass's q-mean templates of the first-pass sources, kept for their
    photometry so that each source is decoded and rendered once per :func:`deblend` call.

    Stored as float16 scaled by each template band's peak (relative rounding <= 2.4e-4 of
    the peak; on the test field the catalogue's fluxes moved by <= 1.1 % of their errors
    against templates rendered again), with box origins in the whole
    scene's pixels: 62 KB per LSST source. Past ``max_bytes`` nothing is kept (``enabled``
    False) and the photometry renders again: memory stays bounded on any image."""

    def __init__(self, n: int, n_bands: int, box: int, max_bytes: int):
        import torch  # torch: fast float16 conversion and row scatter / gather

        self.n = int(n)
        self.enabled = self.n * n_bands * box * box * 2 <= max_bytes
        shape = (self.n if self.enabled else 0, n_bands, box, box)
        self.data = torch.zeros(shape, dtype=torch.float16)
        self.scale = np.zeros(shape[:2], np.float32)
        self.origins = np.zeros((shape[0], 2), np.int64)

    def put(self, rows: np.ndarray, tmpl: np.ndarray, origins: np.ndarray) -> None:
        import torch

        if self.enabled:
            peak = np.abs(tmpl).max((-2, -1))
            peak = np.where(peak > 0, peak, 1.0).astype(np.float32)
            unit = torch.from_numpy(np.ascontiguousarray(tmpl / peak[..., None, None]))
            self.data[torch.as_tensor(rows)] = unit.to(torch.float16)
            self.scale[rows] = peak
            self.origins[rows] = origins

    def extend(self, tmpl: np.ndarray, origins: np.ndarray, max_bytes: int) -> None:
        """Append the templates of further sources (rows ``n, n + 1, ...``), if the cache
        is enabled and stays within ``max_bytes``; else disable it (they are rendered)."""
        import torch

        m = len(tmpl)
        new_n = self.n + m
        fits = self.enabled and new_n * int(np.prod(self.data.shape[1:])) * 2 <= max_bytes
        if not fits:
            self.n, self.enabled = new_n, False
            self.data = self.data[:0]
            self.scale, self.origins = self.scale[:0], self.origins[:0]
            return
        self.data = torch.cat([self.data, torch.zeros((m,) + tuple(self.data.shape[1:]),
                                                      dtype=torch.float16)])
        self.scale = np.concatenate([self.scale, np.zeros((m, self.scale.shape[1]),
                                                          np.float32)])
        self.origins = np.concatenate([self.origins, np.zeros((m, 2), np.int64)])
        self.n = new_n
        self.put(np.arange(new_n - m, new_n), tmpl, origins)

    def get(self, rows: np.ndarray, shift) -> tuple[np.ndarray, np.ndarray]:
        """Templates (float32) and origins of ``rows``, origins moved by ``shift = (dx, dy)``
        (integer pixels: into a sub-scene's coordinates)."""
        import torch

        tmpl = self.data[torch.as_tensor(rows)].float().numpy()
        tmpl *= self.scale[rows][..., None, None]
        return tmpl, self.origins[rows] + np.asarray(shift, np.int64)


def _templates_of(cache: _TemplateCache | None, q, rows: np.ndarray, scene: Scene, prior,
                  band_idx, shift=(0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """q-mean templates and box origins of the sources ``rows`` (their q: ``q``, one row
    each, in ``scene``'s coordinates): taken from ``cache`` where it holds them (origins
    moved by the integer ``shift``), rendered in ``scene`` for the others."""
    enabled = cache is not None and cache.enabled
    known = (rows < cache.n) if enabled else np.zeros(len(rows), bool)
    if known.all():
        return cache.get(rows, shift)
    t_new, o_new = _q_mean_templates(scene, q.take(np.flatnonzero(~known)), prior, band_idx)
    if not known.any():
        return t_new, o_new
    tmpl, origins = cache.get(rows[known], shift)
    out_t = np.empty((len(rows),) + t_new.shape[1:], np.float32)
    out_o = np.empty((len(rows), 2), np.int64)
    out_t[known], out_o[known] = tmpl, origins
    out_t[~known], out_o[~known] = t_new, o_new
    return out_t, out_o


def _chunk_templates(cache: _TemplateCache | None, q, sub: Scene, members: np.ndarray,
                     origin, prior):
    """q-mean templates of a chunk's ``members`` in its sub-scene ``sub`` (origin ``(x0,
    y0)``): cached for first-pass sources, rendered for the others; None without a cache
    (the photometry renders them all)."""
    if cache is None or not cache.enabled or q is None:
        return None
    return _templates_of(cache, q, members, sub, prior, _band_idx(_encoder(prior), sub.bands),
                         (-int(origin[0]), -int(origin[1])))


def _catalog_photometry(scene: Scene, q, prior, post, band_idx, num_samples: int, rng,
                        groups=None, templates=None, systematic=None) -> dict:
    """The closed-form photometry given q's mean morphology, solved per blend group, with
    the error model ``systematic`` (default the encoder card's for one morphology draw; see
    :func:`_amortized_catalog_draws`): :func:`probdeblend.photometry.group_photometry`'s
    dict (``flux`` draws ``(n, num_samples, band)``, ``blendedness`` ``(n,)``...)."""

    from .photometry import REDISTRIBUTE, group_photometry, systematic_of

    tmpl, origins = _q_mean_templates(scene, q, prior, band_idx) if templates is None \
        else templates
    if groups is None:  # deblend's "linkage" groups: friends-of-friends within 2.5"
        # (linking every pair of overlapping 72 px boxes percolated into one group of
        # hundreds of sources on a dense field)
        found, _ = blend_groups(origins, scene.shape, grouping="linkage",
                                link_length=LINK_LENGTH_ARCSEC / scene.pixel_scale, margin=0)
        groups = [g.members for g in found]
    if systematic is None:
        systematic = systematic_of(getattr(post, "card", None) or {}, 1)
    ph = group_photometry(tmpl, origins, np.asarray(scene.image), None, groups, num_samples,
                          rng, systematic, redistribute=REDISTRIBUTE,
                          variance=np.asarray(scene.variance))
    return ph


# ----------------------------------------------------------------------------------------------
# residual detection: sources hidden under their neighbours
# ----------------------------------------------------------------------------------------------


def _model_image(scene: Scene, positions: np.ndarray, prior, chunk_size: int = 512,
                 max_cache_bytes: int = 0):
    """Noiseless model (band, ny, nx) of the sources at ``positions``, their q
    (:class:`~probdeblend.amortized.q.AmortizedQ` in ``scene``'s coordinates, rows in the order
    of ``positions``; None without sources) and the :class:`_TemplateCache` of their templates
    (empty unless ``max_cache_bytes`` allows).

    Each source's amortized q-mean galaxy (decoded latent, at q's mean offset) is rendered
    through the scene's PSFs in its local box (:func:`_q_mean_templates`, the scene
    renderer's forward model) and added, times q's mean flux, into the image. Sources are
    encoded in chunks of ``chunk_size`` (by rows), each on its strip of the image."""
    post = _encoder(prior)
    ny, nx = scene.shape
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    model = np.zeros((scene.n_bands, ny, nx), dtype=np.float32)
    band_idx = _band_idx(post, scene.bands)
    cache = _TemplateCache(len(pos), scene.n_bands, _catalog_box(prior), max_cache_bytes)
    q_all = None
    if len(pos):
        from .amortized.q import AmortizedQ

        parts, where = [], []
        order = np.argsort(pos[:, 1], kind="stable")
        half = post.stamp_size // 2 + 2
        for start in range(0, len(order), int(chunk_size)):
            idx = order[start:start + int(chunk_size)]
            y0 = max(int(np.floor(pos[idx, 1].min())) - half, 0)
            y1 = min(int(np.ceil(pos[idx, 1].max())) + half + 1, ny)
            q = post.predict_q(_sub_scene(scene, (y0, y1, 0, nx)), pos[idx] - [0.0, y0])
            q = q.take(np.arange(len(idx)), shift=(0.0, y0))  # scene coordinates
            parts.append(q)
            where.append(idx)
            tmpl, origins = _q_mean_templates(scene, q, prior, band_idx, model)
            cache.put(idx, tmpl, origins)
            del tmpl
        q_all = AmortizedQ.concatenate(parts).take(np.argsort(np.concatenate(where)))
    return model, q_all, cache


def _residual_detections(scene: Scene, positions: np.ndarray, prior, threshold: float,
                         exclusion: float, chunk_size: int, max_cache_bytes: int = 0):
    """Sources detected (:func:`~probdeblend.detection.detect_sources`, matched-filter and
    lowered-Gaussian S/N >= ``threshold``) in ``image - model`` farther than ``exclusion`` px
    from every known source. Returns ``(positions (m, 2), snr (m,), q, cache)``: q and the
    template cache of the known sources, computed for the model (see :func:`_model_image`)."""
    from .detection import detect_sources

    residual, q, cache = _model_image(scene, positions, prior, chunk_size, max_cache_bytes)
    np.subtract(scene.image, residual, out=residual)  # in place: image - model
    t = detect_sources(scene, threshold=threshold, split_snr=threshold, image=residual)
    del residual
    new = np.stack([np.asarray(t["x"]), np.asarray(t["y"])], -1).reshape(-1, 2)
    snr = np.asarray(t["snr"], np.float64)
    if len(new) and len(positions):
        from scipy.spatial import cKDTree

        d, _ = cKDTree(positions).query(new)
        keep = d > exclusion
        new, snr = new[keep], snr[keep]
    return new, snr, q, cache


def _confirm_residual(scene: Scene, known: np.ndarray, new: np.ndarray, q_known, cache,
                      prior, min_snr: float, seed: int) -> np.ndarray:
    """Which residual-pass candidates ``new`` (m, 2) the photometry confirms: each candidate
    and the sources within ``LINK_LENGTH_ARCSEC`` of it (friends-of-friends; cheaper than
    the footprint groups, which need the whole image, and as good here: the same candidates
    within 2 on the 2048^2 field) are solved jointly
    (:func:`probdeblend.photometry.group_photometry`, the catalogue's q-mean templates and
    calibrated error model) and a candidate is kept when its flux S/N,
    ``sqrt(sum_b (q50_b / width_b)^2)`` over bands (negative fluxes count 0), reaches
    ``min_snr``. A peak that the neighbours' misfit light left in the residual takes flux
    from them only with the blended systematic's width, so its S/N stays low (on the 2048^2
    LSST field: 60 of 161 candidates are galaxies; their S/N median 11.6, the others' 5.7;
    at 7, 54 and 24 are kept).
    Returns ``(keep (m,) bool, q_new, (templates, origins))``: the candidates' q and
    q-mean templates (scene coordinates), for the catalogue to reuse."""
    from .photometry import REDISTRIBUTE, group_photometry, systematic_of

    post = _encoder(prior)
    band_idx = _band_idx(post, scene.bands)
    allpos = np.concatenate([known, new])
    found, _ = blend_groups(allpos, scene.shape, grouping="linkage",
                            link_length=LINK_LENGTH_ARCSEC / scene.pixel_scale, margin=0)
    groups = [g.members for g in found if (g.members >= len(known)).any()]
    rows = np.unique(np.concatenate(groups))  # every source of those groups
    old = rows[rows < len(known)]
    q_new = post.predict_q(scene, new)
    t_new, o_new = _q_mean_templates(scene, q_new, prior, band_idx)
    t_old, o_old = _templates_of(cache, q_known.take(old), old, scene, prior, band_idx)
    local = np.full(len(allpos), -1)
    local[old] = np.arange(len(old))
    local[len(known):] = len(old) + np.arange(len(new))
    ph = group_photometry(np.concatenate([t_old, t_new]), np.concatenate([o_old, o_new]),
                          np.asarray(scene.image), None, [local[g] for g in groups], 200,
                          np.random.default_rng(seed),
                          systematic_of(getattr(post, "card", None) or {}, 1),
                          redistribute=REDISTRIBUTE, variance=np.asarray(scene.variance))
    f = ph["flux"][len(old):]  # (m, draws, band)
    q16, q50, q84 = np.percentile(f, [16, 50, 84], axis=1)
    width = np.maximum(0.5 * (q84 - q16), 1e-30)
    snr = np.sqrt((np.clip(q50 / width, 0.0, None) ** 2).sum(-1))
    return np.nan_to_num(snr) >= float(min_snr), q_new, (t_new, o_new)


def _chunk_q(q_first, sub: Scene, positions: np.ndarray, members: np.ndarray, origin,
             prior):
    """q of a chunk's ``members`` in the coordinates of its sub-scene ``sub`` (origin
    ``(x0, y0)``): the residual pass's q for first-pass sources (the encoder sees only each
    source's cutout, the same pixels in both passes), a new encoding for the others; None
    without a residual pass (the chunk is encoded as a whole)."""
    if q_first is None:
        return None
    shift = (-float(origin[0]), -float(origin[1]))
    known = members < q_first.n_sources
    if known.all():
        return q_first.take(members, shift)
    from .amortized.q import AmortizedQ

    new = _encoder(prior).predict_q(sub, positions[members[~known]] + shift)
    q = AmortizedQ.concatenate([q_first.take(members[known], shift), new])
    order = np.concatenate([np.flatnonzero(known), np.flatnonzero(~known)])
    return q.take(np.argsort(order))


def _write_group_draws(path: Path, d: dict, ids: np.ndarray, scene: Scene,
                       e_from: str) -> None:
    """Amortized draws of one group as ArviZ InferenceData (NetCDF, atomic)."""
    import arviz as az

    from .atomic import write_netcdf

    post = {"flux": np.moveaxis(d["flux"], 1, 0)[None]}  # (chain, draw, source, band)
    for key in ("e1", "e2", "x", "y"):
        post[key] = np.moveaxis(d[key], 1, 0)[None]
    idata = az.from_dict(
        posterior=post, dims={"flux": ["source", "band"], "e1": ["source"], "e2": ["source"],
                              "x": ["source"], "y": ["source"]},
        coords={"source": np.asarray(ids, dtype=np.int64), "band": list(scene.bands)},
        attrs={"method": "amortized", "e_draws_from": e_from, "flux_units": scene.units,
               "pixel_origin": 0},
    )  # fmt: skip
    write_netcdf(idata, path, overwrite=True)


# ----------------------------------------------------------------------------------------------
# refinement per group
# ----------------------------------------------------------------------------------------------
def _fit_group(sub: Scene, prior, fit_method: str, num_samples: int, seed: int,
               fit_kwargs: dict) -> tuple[dict, dict]:
    """``probdeblend.fit`` on one group's sub-scene; draws (n, S, ...) and diagnostics."""
    from .fit import fit

    idata = fit(sub, prior=prior, method=fit_method, num_samples=num_samples, seed=seed,
                **fit_kwargs)
    p = idata.posterior

    def per_source(name):  # (chain, draw, source, ...) -> (source, chain * draw, ...)
        a = np.asarray(p[name].values, np.float64)
        a = a.reshape((-1,) + a.shape[2:])
        return np.moveaxis(a, 0, 1)

    names = {"flux": "flux", "e1": "e1", "e2": "e2",
             "x": "x" if "x" in p else "x_pix", "y": "y" if "y" in p else "y_pix"}
    draws = {k: per_source(v) for k, v in names.items()}
    n = draws["x"].shape[0]
    diag: dict[str, Any] = {"method": f"fit:{idata.attrs.get('method', fit_method)}"}
    diag["pareto_k"] = np.asarray(idata.attrs.get("pareto_k", np.full(n, np.nan)), float)
    if len(diag["pareto_k"]) != n:
        diag["pareto_k"] = np.full(n, np.nan)
    r_hat, ess = np.full(n, np.nan), np.full(n, np.nan)
    if p.sizes.get("chain", 1) > 1:
        import arviz as az

        rh = az.rhat(p[list(names.values())])
        es = az.ess(p[list(names.values())], method="bulk")
        for k in range(n):
            vals = [np.nanmax(np.asarray(rh[v].isel(source=k))) for v in rh.data_vars]
            r_hat[k] = np.nanmax(vals)
            vals = [np.nanmin(np.asarray(es[v].isel(source=k))) for v in es.data_vars]
            ess[k] = np.nanmin(vals)
    diag["r_hat"], diag["ess_bulk"] = r_hat, ess
    n_div = -1
    ss = getattr(idata, "sample_stats", None)
    if ss is not None and "diverging" in ss:
        n_div = int(np.asarray(ss["diverging"]).sum())
    diag["n_divergent"] = np.full(n, n_div)
    diag["idata"] = idata
    return draws, diag


# ----------------------------------------------------------------------------------------------
# the public entry point
# ----------------------------------------------------------------------------------------------
def _check(scene, method, num_samples, seed, chunk_size, grouping, flux_systematic=None,
           residual_min_snr=0.0):
    if not isinstance(scene, Scene):
        raise SceneError("scene", f"expected a probdeblend.Scene, got {type(scene).__name__}; "
                                  "build one with probdeblend.Scene(...) or Scene.from_fits(path)")
    if method not in METHODS:
        raise ArgumentError("method", method, f"must be one of {METHODS}")
    if grouping not in GROUPINGS:
        raise ArgumentError("grouping", grouping, f"must be one of {GROUPINGS}")
    for name, v in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ArgumentError(name, v, "must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ArgumentError("seed", seed, "must be an int")
    if flux_systematic is not None:
        from .photometry import Systematic

        if not isinstance(flux_systematic, Systematic):
            raise ArgumentTypeError("flux_systematic", flux_systematic,
                                    "give None (the encoder's calibration) or a "
                                    "probdeblend.photometry.Systematic")
        flux_systematic.check("flux_systematic")
    if not (np.isfinite(residual_min_snr) and residual_min_snr >= 0):
        raise ArgumentError("residual_min_snr", residual_min_snr,
                            "must be a finite number >= 0 (0 keeps every residual candidate)")


def _chunks(groups: Sequence[BlendGroup], chunk_size: int) -> list[list[BlendGroup]]:
    out, cur, n = [], [], 0
    for g in groups:
        if cur and n + g.size > chunk_size:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += g.size
    if cur:
        out.append(cur)
    return out


def _union_box(groups: Sequence[BlendGroup]):
    b = np.array([g.bbox for g in groups])
    return int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())


def _masked_fraction(mask_any: np.ndarray, pos: np.ndarray, radius: float) -> np.ndarray:
    ny, nx = mask_any.shape
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (dx**2 + dy**2) <= radius**2
    out = np.zeros(len(pos))
    for k, (x, y) in enumerate(pos):
        i, j = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        yy, xx = j + dy[disk], i + dx[disk]
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        m = np.ones(len(yy), bool)  # outside the image counts as masked
        m[inside] = mask_any[yy[inside], xx[inside]]
        out[k] = m.mean()
    return out


def deblend(scene: Scene, method: str = "amortized", prior="lsst-vae", num_samples: int = 200,
            seed: int = 0, detect_kwargs: dict | None = None, grouping: str = "footprint",
            dilate: int = 2, link_length: float | None = None, margin: int | None = None,
            chunk_size: int = 512, residual_pass: bool = True, residual_threshold: float = 10.0,
            residual_exclusion: float = 3.0, residual_min_snr: float = 7.0,
            fit_method: str = "amortized",
            fit_kwargs: dict | None = None, draws_dir: str | Path | None = None,
            progress: bool = False, return_groups: bool = False, flux_systematic=None):
    """Deblend a whole image into a catalogue with posterior summaries (one row per source).

    Parameters
    ----------
    scene : Scene
        Any size. Its bands must include the prior's (extra bands are dropped).
        ``scene.positions`` (0-based pixels) skips detection.
    method : {"amortized", "fit"}
        ``"amortized"``: amortized posterior draws, batched over the whole image.
        ``"fit"``: :func:`probdeblend.fit` per blend group with ``fit_method`` (slower,
        diagnostics per source); the amortized result is kept for a group whose fit fails.
    prior : str or LearnedPrior
    num_samples : int
        Posterior draws per source (summaries: mean, std, 16/50/84% quantiles).
    seed : int
        Seeds every random step (chunk ``k`` uses ``SeedSequence([seed, k])``, group ``g``'s
        fit ``SeedSequence([seed, g])``).
    detect_kwargs : dict, optional
        Passed to :func:`probdeblend.detection.detect_sources` (e.g. ``threshold``).
    grouping : {"footprint", "linkage"}
        Blend-group definition, see the module notes.
    dilate : int
        Footprint dilation in pixels (``"footprint"``).
    link_length : float, optional
        Linking length in pixels (``"linkage"``; default 2.5 arcsec).
    margin : int, optional
        Pixels around each group for its sub-scene (default half the encoder stamp + 2).
    chunk_size : int
        Sources encoded per batch; bounds memory (a group is never split).
    residual_pass : bool
        After detection, render every detected source's amortized q-mean galaxy, subtract the
        model and detect again (``detect_sources`` at ``residual_threshold`` sigma, farther than
        ``residual_exclusion`` px from known sources): finds galaxies hidden under brighter
        neighbours (``det_pass = 1`` in the catalogue). Only when sources are detected.
    residual_threshold, residual_exclusion : float
        See ``residual_pass`` (sigma; pixels).
    residual_min_snr : float
        A residual-pass candidate is kept only when the photometry, solving it jointly with
        its known neighbours, gives it a flux S/N of at least this, combined over the bands
        (``sqrt(sum_b S/N_b^2)``; for the 6 LSST bands a source of zero flux gives ~2.4
        median; default 7, chosen on the 2048^2 benchmark field; 0 keeps every candidate):
        peaks left by the neighbours' misfit light are dropped.
    fit_method : str
        ``method`` of :func:`probdeblend.fit` for ``method="fit"``.
    fit_kwargs : dict, optional
        Further arguments of :func:`probdeblend.fit` (``num_chains``, ``num_warmup``...).
    draws_dir : path, optional
        Keep the posterior draws: each group's InferenceData is written there as
        ``group_<id>.nc`` (atomically; ``source`` coordinate = catalogue ``id``). With
        ``method="fit"`` it is the full result of :func:`probdeblend.fit`; with ``"amortized"``
        a posterior group with ``flux`` (chain, draw, source, band), ``e1``, ``e2``, ``x``,
        ``y``. One file per group: meant for small images or selected regions.
    progress : bool
        tqdm progress bar over chunks / groups.
    return_groups : bool
        Also return the list of :class:`BlendGroup`.
    flux_systematic : probdeblend.photometry.Systematic, optional
        The amortized catalogue's flux error model beyond the statistical errors given q's
        mean morphology. Default: the encoder card's calibration for one morphology draw
        (:func:`probdeblend.photometry.systematic_of`, fitted on held-out simulated scenes by
        ``benchmarks/calibrate_photometry.py --catalog``). ``Systematic()``: the statistical
        errors alone (Gaussian), e.g. to calibrate the model on your own simulations.

    Returns
    -------
    astropy.table.Table
        The catalogue (:mod:`probdeblend.catalog` documents every column); ``meta`` holds
        timings (``T_DETECT``, ``T_GROUP``, ``T_INFER``, ``T_TOTAL`` seconds) and settings.

    Raises
    ------
    SceneError, ArgumentError
        Bad scene or arguments (the message names the argument).
    """
    from .catalog import MASK_RADIUS, make_catalog, schema, summary_columns

    _check(scene, method, num_samples, seed, chunk_size, grouping, flux_systematic,
           residual_min_snr)
    t_start = time.perf_counter()
    prior = _resolve_prior(prior)
    missing = [b for b in prior.bands if b not in scene.bands]
    if missing:
        from .errors import BandMismatchError

        raise BandMismatchError("bands", f"the prior {prior.name!r} needs bands "
                                         f"{list(prior.bands)}; the scene lacks {missing}")
    if tuple(scene.bands) != tuple(prior.bands):
        scene = scene.select_bands(prior.bands)
    stamp = _encoder(prior).stamp_size
    margin = stamp // 2 + 2 if margin is None else int(margin)
    ny, nx = scene.shape
    if link_length is None:
        link_length = LINK_LENGTH_ARCSEC / scene.pixel_scale

    # 1. sources
    t0 = time.perf_counter()
    from .detection import detect_sources

    det_kw = dict(detect_kwargs or {})
    snr_det = None
    segmap = None
    det_pass = None
    n_rejected = 0  # residual-pass candidates the photometry did not confirm
    q_first = None  # q of the first-pass sources, from the residual pass
    cache = None  # and their q-mean templates
    if scene.positions is not None and len(scene.positions):
        positions = np.asarray(scene.positions, dtype=np.float64)
        if grouping == "footprint":  # footprints only (no splitting needed)
            _, segmap = detect_sources(scene, return_segmap=True, **{**det_kw, "split": False})
    else:
        table, segmap = detect_sources(scene, return_segmap=True, **det_kw)
        positions = np.stack([np.asarray(table["x"]), np.asarray(table["y"])], -1)
        positions = positions.reshape(-1, 2).astype(np.float64)
        snr_det = np.asarray(table["snr"], np.float64)
        det_pass = np.zeros(len(positions), dtype=np.int64)
        if residual_pass and len(positions):
            new, new_snr, q_first, cache = _residual_detections(
                scene, positions, prior, float(residual_threshold),
                float(residual_exclusion), int(chunk_size),
                TEMPLATE_CACHE_BYTES)
            if len(new) and residual_min_snr > 0:
                ok, q_new, (t_new, o_new) = _confirm_residual(
                    scene, positions, new, q_first, cache, prior, float(residual_min_snr),
                    int(seed))
                n_rejected = int((~ok).sum())
                new, new_snr = new[ok], new_snr[ok]
                if len(new):  # the kept candidates' q and templates: not computed again
                    from .amortized.q import AmortizedQ

                    keep = np.flatnonzero(ok)
                    q_first = AmortizedQ.concatenate([q_first, q_new.take(keep)])
                    if cache is not None:
                        cache.extend(t_new[keep], o_new[keep], TEMPLATE_CACHE_BYTES)
            if len(new):
                positions = np.concatenate([positions, new])
                snr_det = np.concatenate([snr_det, new_snr])
                det_pass = np.concatenate([det_pass, np.ones(len(new), dtype=np.int64)])
    t_detect = time.perf_counter() - t0

    # 2. groups
    t0 = time.perf_counter()
    groups, labels = blend_groups(positions, (ny, nx), segmap, grouping, int(dilate),
                                  float(link_length), margin)
    t_group = time.perf_counter() - t0

    n = len(positions)
    S = int(num_samples)
    order = np.concatenate([g.members for g in groups]) if groups else np.zeros(0, int)
    group_of = np.empty(n, dtype=np.int64)
    gsize = np.empty(n, dtype=np.int64)
    for g in groups:
        group_of[g.members] = g.id
        gsize[g.members] = g.size
    cols: dict[str, Any] = {
        "id": np.arange(n, dtype=np.int64),
        "group": group_of[order], "group_size": gsize[order],
        "x_init": positions[order, 0], "y_init": positions[order, 1],
        "snr_det": (np.full(n, np.nan) if snr_det is None else snr_det)[order],
        "det_pass": (np.full(n, -1, np.int64) if det_pass is None else det_pass)[order],
        "num_samples": np.full(n, S, dtype=np.int64),
        "method": np.full(n, method, dtype="U24"),
        "e_draws_from": np.full(n, "q_mean", dtype="U9"),
        "pareto_k": np.full(n, np.nan), "r_hat": np.full(n, np.nan),
        "ess_bulk": np.full(n, np.nan), "n_divergent": np.full(n, -1, dtype=np.int64),
        "flag_failed": np.zeros(n, bool), "fail_reason": np.full(n, "", dtype="U80"),
    }
    row_of = np.empty(n, dtype=np.int64)
    row_of[order] = np.arange(n)
    half = (stamp - 1) / 2.0
    cols["flag_edge"] = ((positions[order, 0] - half < -0.5) | (positions[order, 1] - half < -0.5)
                         | (positions[order, 0] + half > nx - 0.5)
                         | (positions[order, 1] + half > ny - 0.5))
    mask_any = np.asarray(scene.mask).any(axis=0)
    cols["masked_frac"] = _masked_fraction(mask_any, positions[order], MASK_RADIUS)
    del mask_any

    # posterior summaries, filled chunk by chunk / group by group (draws are not kept whole)
    for name, dtype, _, _ in schema(scene.bands, scene.units, wcs=False):
        if name not in cols and dtype == "f8" and name != "pos_err":
            cols[name] = np.full(n, np.nan)

    def put(rows, d, dx=0.0, dy=0.0):
        summ = summary_columns({"flux": d["flux"], "e1": d["e1"], "e2": d["e2"],
                                "x": d["x"] + dx, "y": d["y"] + dy}, scene.bands)
        for key, val in summ.items():
            cols[key][rows] = val

    # 3-4. amortized draws, chunk by chunk (a chunk is a strip of whole groups)
    t0 = time.perf_counter()
    if draws_dir is not None:
        Path(draws_dir).mkdir(parents=True, exist_ok=True)
    chunks = _chunks(groups, int(chunk_size))
    it = enumerate(chunks)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(chunks), desc="deblend chunks", unit="chunk")
    for k, chunk in it:
        y0, y1, x0, x1 = _union_box(chunk)
        members = np.concatenate([g.members for g in chunk])
        sub = _sub_scene(scene, (y0, y1, x0, x1))
        chunk_seed = int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])
        try:
            bounds = np.cumsum([0] + [g.size for g in chunk])  # groups are contiguous
            local = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            q_chunk = _chunk_q(q_first, sub, positions, members, (x0, y0), prior)
            d = _amortized_catalog_draws(sub, positions[members] - [x0, y0], prior, S,
                                         chunk_seed, groups=local, q=q_chunk,
                                         templates=_chunk_templates(cache, q_chunk, sub,
                                                                    members, (x0, y0),
                                                                    prior),
                                         systematic=flux_systematic)
        except ProbdeblendError as err:
            rows = row_of[members]
            cols["flag_failed"][rows] = True
            cols["fail_reason"][rows] = f"amortized: {err}"[:80]
            continue
        rows = row_of[members]
        put(rows, d, x0, y0)
        if draws_dir is not None and method == "amortized":
            start = 0
            for g in chunk:  # one InferenceData per group, sources in catalogue order
                sl = slice(start, start + g.size)
                start += g.size
                _write_group_draws(Path(draws_dir) / f"group_{g.id:06d}.nc",
                                   {key: d[key][sl] for key in ("flux", "e1", "e2")}
                                   | {"x": d["x"][sl] + x0, "y": d["y"][sl] + y0},
                                   row_of[g.members], scene, d.get("e_draws_from", ""))
        if d.get("e_draws_from") == "q_mean":  # identical draws: the width is exactly 0
            cols["e1_err"][rows] = cols["e2_err"][rows] = 0.0
        cols["e_draws_from"][rows] = d.get("e_draws_from", "posterior")
        cols["method"][rows] = d.get("method", "amortized")
        cols["pareto_k"][rows] = d.get("pareto_k", np.full(len(rows), np.nan))
        cols["blendedness"][rows] = d["blendedness"]
        for k, b in enumerate(scene.bands):
            cols[f"chi2_{b}"][rows] = d["chi2"][:, k]
        bad = ~np.isfinite(d["e1"][:, 0])
        if bad.any():
            cols["flag_failed"][rows[bad]] = True
            cols["fail_reason"][rows[bad]] = "shape: adaptive moments failed on q-mean image"
        del d, sub

    # 5. refinement per group
    if method == "fit":
        git = groups
        if progress:
            from tqdm.auto import tqdm

            git = tqdm(groups, desc="fit groups", unit="group")
        for g in git:
            rows = row_of[g.members]
            sub = _sub_scene(scene, g.bbox, positions[g.members],
                             labels if grouping == "footprint" else None, g.id + 1)
            gseed = int(np.random.SeedSequence([int(seed), int(g.id)]).generate_state(1)[0])
            gseed = gseed % (2**31 - 1)
            try:
                gd, diag = _fit_group(sub, prior, fit_method, S, gseed, dict(fit_kwargs or {}))
            except (ProbdeblendError, ValueError, RuntimeError, FloatingPointError) as err:
                cols["flag_failed"][rows] = True
                cols["fail_reason"][rows] = f"fit: {type(err).__name__}: {err}"[:80]
                continue
            if gd["x"].shape[1] != S:  # several chains: keep S evenly spaced draws
                idx = np.linspace(0, gd["x"].shape[1] - 1, S).astype(int)
                gd = {k: v[:, idx] for k, v in gd.items()}
            y0, _, x0, _ = g.bbox
            put(rows, gd, x0, y0)
            cols["flag_failed"][rows] = False
            cols["fail_reason"][rows] = ""
            cols["e_draws_from"][rows] = "posterior"
            cols["method"][rows] = diag["method"][:24]
            for key in ("pareto_k", "r_hat", "ess_bulk", "n_divergent"):
                cols[key][rows] = diag[key]
            if draws_dir is not None:
                from .atomic import write_netcdf

                write_netcdf(diag["idata"], Path(draws_dir) / f"group_{g.id:06d}.nc",
                             overwrite=True)
    t_infer = time.perf_counter() - t0

    meta = {
        "METHOD": method, "PRIOR": prior.name, "NSAMPLES": S, "SEED": int(seed),
        "GROUPING": grouping, "DILATE": int(dilate), "LINKLEN": float(link_length),
        "MARGIN": int(margin), "CHUNK": int(chunk_size), "NGROUPS": len(groups),
        "RESPASS": bool(residual_pass and det_pass is not None),
        "RESMINSN": float(residual_min_snr), "NRESREJ": n_rejected,
        "MAXGROUP": int(max((g.size for g in groups), default=0)),
        "NX": int(nx), "NY": int(ny), "T_DETECT": round(t_detect, 3),
        "T_GROUP": round(t_group, 3), "T_INFER": round(t_infer, 3),
    }
    if method == "fit":
        meta["FITMETH"] = fit_method
    cat = make_catalog(scene.bands, scene.units, cols, wcs=scene.wcs, meta=meta)
    cat.meta["T_TOTAL"] = round(time.perf_counter() - t_start, 3)
    if n and np.all(cols["flag_failed"]):
        warnings.warn(f"every source failed: {cols['fail_reason'][0]}", stacklevel=2)
    return (cat, groups) if return_groups else cat
