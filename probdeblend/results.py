"""Posterior results as ArviZ InferenceData, built from one declarative schema.

:func:`build_inference_data` turns the arrays an inference engine produces (posterior draws,
sampler statistics, pointwise log-likelihood, replicated images, per-source model images) into
an :class:`arviz.InferenceData` that follows the ArviZ schema, so that every ArviZ function
works on it (``az.summary``, ``az.plot_trace``, ``az.loo``, ``az.plot_ppc``, netCDF I/O):

* no variable shares its name with a dimension: positions are ``x_pix`` / ``y_pix`` (the
  dimensions ``x`` / ``y`` index image columns / rows);
* ``observed_data`` holds only the observed random variable, the ``image``; the constants the
  likelihood needs (``variance``, ``psf``) and the ``position_given`` of the sources go to
  ``constant_data``;
* ``log_likelihood`` and ``posterior_predictive`` are aligned draw for draw with ``posterior``
  (same ``chain`` / ``draw`` coordinates); a smaller predictive is an explicit choice
  (``predictive_draws``, see :func:`predictive_draw_index`), recorded in ``attrs``;
* ``attrs`` carry ``inference_library`` and ``inference_library_version`` (plus ``method``,
  ``probdeblend_version``, ``units``, ``pixel_scale``, ``bands``, ``conventions``);
* each source's **deblended image** (posterior mean of its PSF-convolved model in the scene's
  frame, and its pixel standard deviation over draws) is the group ``deblended``
  (``image``, ``image_std``; dims ``source, band, y, x``). ``deblended.image.sum("source")`` is
  the posterior-mean model of the scene.

Schema (dims after ``chain, draw`` for the draw groups)
-------------------------------------------------------
==========================  =====================  =====================================
group / variable            dims                   meaning
==========================  =====================  =====================================
posterior.flux              source, band           total flux of the PSF-convolved galaxy
                                                   (scene units)
posterior.log_flux          source, band           ln flux
posterior.e1, .e2           source                 GalSim reduced shear g of the PSF-free
                                                   galaxy (:mod:`probdeblend.measure`)
posterior.x_pix, .y_pix     source                 0-based pixel centre coordinates
posterior.offset            source, xy             position - position_given (pix)
posterior.latent            source, latent_dim     latent vector of the prior
posterior.latent_base       source, latent_dim     the latent flow's base-space vector
sample_stats.*              (none)                 engine statistics: lp, diverging,
                                                   acceptance_rate, tree_depth, n_steps,
                                                   step_size, energy, ...
observed_data.image         band, y, x             the observed image
constant_data.variance      band, y, x             per-pixel variance (inf = masked)
constant_data.psf           band, psf_y, psf_x     PSF image per band
constant_data.psf_flux_fraction band               light of a star inside each PSF image
constant_data.position_given source, xy            positions handed in or detected
posterior_predictive.image  band, y, x             replicated noisy image per draw
log_likelihood.image        band, y, x  (pixel)    pointwise log-likelihood (0 on masked
                            or band     (band)     pixels); level in attrs
deblended.image, .image_std source, band, y, x     per-source posterior mean / std image
==========================  =====================  =====================================

Any other posterior variable is stored too, its dims taken from ``dims`` or inferred from its
shape (``(source,)``, ``(source, band)``, ``(source, latent_dim)``, ``(source, xy)``).

Pointwise log-likelihood: per pixel when ``chain * draw * band * y * x`` is at most
``max_pointwise`` values (default :data:`MAX_POINTWISE`, 80 MB of float64); above that it is
summed over the pixels of each band before storing, and ``attrs["log_likelihood_level"]`` says
``"band"`` with the reason in ``attrs["log_likelihood_note"]``: ``az.loo`` then treats bands,
not pixels, as the observations (a coarse check). Producers can ask :func:`pointwise_level`
first and compute only what will be stored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArgumentError

__all__ = [
    "build_inference_data",
    "pointwise_level",
    "predictive_draw_index",
    "ImageMoments",
    "arviz",
    "Var",
    "SCHEMA",
    "CONVENTIONS",
    "LATENT_DIM",
    "MAX_POINTWISE",
]

#: One-line statement of the units and conventions stored with every result.
CONVENTIONS = (
    "e1, e2: GalSim reduced shear of the PSF-free galaxy; x_pix, y_pix: 0-based pixel centres "
    "(the centre of image[b, j, i] is x_pix=i, y_pix=j); flux: total flux of the PSF-convolved "
    "galaxy in image units"
)
#: Name of the latent-space dimension (not ``"latent"``, the variable's name).
LATENT_DIM = "latent_dim"
#: Largest pointwise log-likelihood (values) stored per pixel; larger ones are stored per band.
MAX_POINTWISE = 10_000_000


@dataclass(frozen=True)
class Var:
    """One row of the schema: a variable's group, dims (after chain, draw) and meaning."""

    name: str
    group: str
    dims: tuple[str, ...]
    unit: str = ""
    doc: str = ""
    required: bool = False
    aliases: tuple[str, ...] = ()


#: The declarative table: every variable probdeblend writes, by group.
SCHEMA: tuple[Var, ...] = (
    Var("flux", "posterior", ("source", "band"), "{units}",
        "total flux of the PSF-convolved galaxy", required=True),
    Var("log_flux", "posterior", ("source", "band"), "", "ln of flux in {units}"),
    Var("e1", "posterior", ("source",), "", "GalSim reduced shear g1, PSF-free", required=True),
    Var("e2", "posterior", ("source",), "", "GalSim reduced shear g2, PSF-free", required=True),
    Var("x_pix", "posterior", ("source",), "pix", "0-based column of the centre",
        required=True, aliases=("x",)),
    Var("y_pix", "posterior", ("source",), "pix", "0-based row of the centre",
        required=True, aliases=("y",)),
    Var("offset", "posterior", ("source", "xy"), "pix", "position - position_given"),
    Var("latent", "posterior", ("source", LATENT_DIM), "", "latent vector of the prior"),
    Var("latent_base", "posterior", ("source", LATENT_DIM), "", "latent flow base vector"),
    Var("image", "observed_data", ("band", "y", "x"), "{units}", "observed image"),
    Var("variance", "constant_data", ("band", "y", "x"), "({units})^2",
        "per-pixel variance, inf = masked"),
    Var("psf", "constant_data", ("band", "psf_y", "psf_x"), "", "PSF image per band (sum 1)"),
    Var("psf_flux_fraction", "constant_data", ("band",), "",
        "fraction of a star's light inside each PSF image (fluxes are total fluxes)"),
    Var("position_given", "constant_data", ("source", "xy"), "pix",
        "positions handed in or detected"),
    Var("image", "posterior_predictive", ("band", "y", "x"), "{units}",
        "replicated noisy image"),
    Var("image", "log_likelihood", ("band", "y", "x"), "", "pointwise log-likelihood"),
    Var("image", "deblended", ("source", "band", "y", "x"), "{units}",
        "posterior mean of the source's PSF-convolved model in the scene frame"),
    Var("image_std", "deblended", ("source", "band", "y", "x"), "{units}",
        "pixel standard deviation of that model over the posterior draws"),
)


def _schema(group: str) -> dict[str, Var]:
    return {v.name: v for v in SCHEMA if v.group == group}


def arviz():
    """Import ArviZ without its import-time migration FutureWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def _version(dist: str) -> str:
    if dist == "probdeblend":
        from . import __version__

        return str(__version__)
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def pointwise_level(
    n_chain: int, n_draw: int, scene, max_pointwise: int = MAX_POINTWISE
) -> str:
    """``"pixel"`` if a per-pixel log-likelihood of this size is stored, else ``"band"``."""
    ny, nx = scene.shape
    return "pixel" if n_chain * n_draw * scene.n_bands * ny * nx <= max_pointwise else "band"


def predictive_draw_index(n_draw: int, n_predictive: int | None) -> np.ndarray:
    """Posterior draw indices of an explicit ``n_predictive``-draw predictive (evenly spaced).

    ``None`` or ``n_predictive >= n_draw`` gives every draw (the aligned default).
    """
    if n_predictive is None or int(n_predictive) >= n_draw:
        return np.arange(n_draw)
    if int(n_predictive) < 1:
        raise ArgumentError("n_predictive", n_predictive, "must be >= 1 or None (all draws)")
    return np.linspace(0, n_draw - 1, int(n_predictive)).round().astype(int)


class ImageMoments:
    """Running mean and standard deviation of per-draw images, added in batches.

    For the ``deblended`` group: feed each batch of per-source model images
    ``(n, source, band, y, x)`` as the draws are rendered, so the ``(draws, source, band, y, x)``
    array never has to exist (Chan et al.'s parallel update of Welford's algorithm, float64).

    >>> m = ImageMoments()
    >>> for batch in batches:              # doctest: +SKIP
    ...     m.add(batch)
    >>> build_inference_data(..., source_images_mean=m.mean, source_images_std=m.std)  # +SKIP
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def add(self, batch: Any) -> None:
        """Add draws ``batch`` with the draw axis first."""
        b = np.asarray(batch, dtype=np.float64)
        if b.shape[0] == 0:
            return
        n_b, mean_b = b.shape[0], b.mean(0)
        m2_b = ((b - mean_b) ** 2).sum(0)
        if self._mean is None:
            self.n, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self._mean.shape:
            raise ArgumentError("batch", b.shape, f"expected (n, *{self._mean.shape})")
        n = self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    @property
    def mean(self) -> np.ndarray:
        """Mean over the draws added so far."""
        if self._mean is None:
            raise ArgumentError("batch", 0, "no draws added yet")
        return self._mean

    @property
    def std(self) -> np.ndarray:
        """Standard deviation (ddof=0) over the draws added so far."""
        return np.sqrt(np.maximum(self._m2, 0.0) / self.n) if self.n else self.mean * np.nan


def _array(value: Any, name: str, lead: tuple[int, ...] | None, min_ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ArgumentError(name, str(arr.dtype), f"expected a numeric array, got dtype "
                            f"{arr.dtype}")
    if arr.ndim < min_ndim:
        raise ArgumentError(
            name, arr.shape, f"expected at least {min_ndim} dimensions with leading (chain, "
            f"draw), got shape {arr.shape}; add a chain axis with x[None] for a single chain")
    if lead is not None and arr.shape[:2] != lead:
        raise ArgumentError(name, arr.shape, f"leading (chain, draw) shape {arr.shape[:2]} "
                            f"differs from the posterior's {lead}")
    return arr


def _expect(arr: np.ndarray, name: str, tail: tuple[int, ...], what: str) -> None:
    if arr.shape[2:] != tail:
        raise ArgumentError(name, arr.shape, f"expected shape (chain, draw, {what}) = "
                            f"(chain, draw, {', '.join(map(str, tail))}), got {arr.shape}")


def _attr_value(v: Any):
    """An attribute value netCDF can store (None -> dropped by the caller)."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (str, int, float, np.integer, np.floating)):
        return v
    if isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v)
        if arr.dtype.kind in "fiu" and arr.ndim == 1:
            return arr.tolist()
        return json.dumps(np.asarray(v).tolist())
    if isinstance(v, Mapping):
        return json.dumps(v, default=str)
    return str(v)


def _infer_dims(rest, n_source, n_band, n_latent, name):
    if rest == ():
        return []
    if rest == (n_source,):
        return ["source"]
    if len(rest) == 2 and rest[0] == n_source:
        if rest[1] == 2 and name in ("position", "offset"):
            return ["source", "xy"]
        if "latent" in name and rest[1] == n_latent:
            return ["source", LATENT_DIM]
        if rest[1] == n_band:
            return ["source", "band"]
        if rest[1] == n_latent:
            return ["source", LATENT_DIM]
    return None  # ArviZ's default names


def build_inference_data(
    draws: Mapping[str, Any],
    scene,
    *,
    method: str = "unspecified",
    library: str = "probdeblend",
    source_ids: Sequence[Any] | None = None,
    sample_stats: Mapping[str, Any] | None = None,
    log_likelihood: Any = None,
    posterior_predictive: Any = None,
    predictive_draws: Sequence[int] | None = None,
    source_images_mean: Any = None,
    source_images_std: Any = None,
    positions_given: Any = None,
    attrs: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    max_pointwise: int = MAX_POINTWISE,
):
    """Posterior of a scene as :class:`arviz.InferenceData` (schema: module docstring).

    Parameters
    ----------
    draws : dict of str -> array (chain, draw, ...)
        Posterior draws. Required: ``flux`` (chain, draw, source, band) in scene units,
        ``e1``, ``e2``, ``x_pix``, ``y_pix`` (chain, draw, source); ``x`` / ``y`` are accepted
        for ``x_pix`` / ``y_pix``. Optional schema variables: ``log_flux``, ``offset``
        (source, 2), ``latent``, ``latent_base`` (source, D). Any other variable is stored with
        dims from ``dims`` or inferred from its shape.
    scene : probdeblend.Scene
        The fitted observation (bands, image, variance, PSF, units, pixel scale); its bands
        must be the draws' band axis, in order.
    method : str
        Engine that produced the draws as it actually ran (e.g. ``"amortized+is"``,
        ``"laplace+psis"``, ``"nuts"``, ``"svi"``); stored as ``attrs["method"]``.
    library : str
        Distribution that ran the engine (``"numpyro"``, ``"pyro"``, ``"probdeblend"`` for the
        package's own importance sampling); ``attrs["inference_library"]`` and
        ``attrs["inference_library_version"]`` (looked up with importlib.metadata).
    source_ids : sequence, optional
        Coordinates of ``source`` (default ``0 .. S-1``); unique.
    sample_stats : dict of str -> array (chain, draw[, ...]), optional
        Engine statistics under ArviZ names (``lp``, ``diverging``, ``acceptance_rate``,
        ``tree_depth``, ``n_steps``, ``step_size``, ``energy``...).
    log_likelihood : array, optional
        Pointwise log-likelihood of every posterior draw, aligned with ``draws``:
        ``(chain, draw, band, y, x)`` per pixel (0 on masked pixels), or ``(chain, draw, band)``
        summed per band. Per-pixel input larger than ``max_pointwise`` values is summed per band
        (``attrs["log_likelihood_level"]``, ``attrs["log_likelihood_note"]``).
    posterior_predictive : array (chain, n_pred, band, y, x), optional
        Replicated noisy images. ``n_pred`` must equal the posterior's ``draw`` unless
        ``predictive_draws`` says which posterior draws they belong to.
    predictive_draws : sequence of int, optional
        Posterior ``draw`` index of each predictive draw (an explicit subset, e.g. from
        :func:`predictive_draw_index`); stored as the group's ``draw`` coordinate and
        ``attrs["n_predictive"]``.
    source_images_mean, source_images_std : array (source, band, y, x), optional
        Each source's deblended image: posterior mean and pixel std over draws of its
        PSF-convolved model in the scene's frame (group ``deblended``).
    positions_given : array (source, 2), optional
        ``(x, y)`` positions handed in or detected (``constant_data.position_given``).
    attrs : dict, optional
        More attributes (``prior``, ``pareto_k`` per source, timings, seeds...), stored on the
        result and on the posterior group; ``None`` values are dropped, bools become ints,
        dicts and ragged lists JSON strings.
    dims : dict of str -> list of str, optional
        Dims (after chain, draw) of extra posterior variables.
    max_pointwise : int
        Size limit of the per-pixel log-likelihood (see above).

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior``, ``observed_data``, ``constant_data`` and, when given,
        ``sample_stats``, ``log_likelihood``, ``posterior_predictive``, ``deblended``.

    Raises
    ------
    probdeblend.errors.ArgumentError
        (a ``ValueError``) naming the argument / variable whose shape or type is wrong.
    """
    az = arviz()
    if not isinstance(draws, Mapping):
        raise ArgumentError("draws", type(draws).__name__, "expected a dict of arrays")
    post_schema = _schema("posterior")
    alias = {a: v.name for v in post_schema.values() for a in v.aliases}
    named: dict[str, Any] = {}
    for key, value in draws.items():
        name = alias.get(key, key)
        if name in named:
            raise ArgumentError("draws", key, f"both {key!r} and {name!r} given; pass one")
        named[name] = value
    missing = [v.name for v in post_schema.values() if v.required and v.name not in named]
    if missing:
        raise ArgumentError(
            "draws", sorted(draws), f"missing required variable(s) {missing}; expected flux "
            "(chain, draw, source, band) and e1, e2, x_pix, y_pix (chain, draw, source)")

    bands = list(scene.bands)
    ny, nx = scene.shape
    flux = _array(named["flux"], "draws['flux']", None, 4)
    lead = flux.shape[:2]
    n_source = flux.shape[2]
    _expect(flux, "draws['flux']", (n_source, len(bands)), f"source, band={len(bands)}")
    n_latent = None
    for lat in ("latent", "latent_base"):
        if lat in named:
            n_latent = _array(named[lat], f"draws[{lat!r}]", lead, 4).shape[3]

    posterior: dict[str, np.ndarray] = {}
    var_dims: dict[str, list[str]] = {}
    user_dims = {k: list(v) for k, v in (dims or {}).items()}
    sizes = {"source": n_source, "band": len(bands), "xy": 2, LATENT_DIM: n_latent}
    for name, value in named.items():
        src = name if name in draws else next(a for a, n in alias.items() if n == name)
        arr = _array(value, f"draws[{src!r}]", lead, 2)
        if name in post_schema:
            d = post_schema[name].dims
            _expect(arr, f"draws[{src!r}]", tuple(sizes[k] for k in d), ", ".join(d))
            var_dims[name] = list(d)
        elif name in user_dims:
            var_dims[name] = user_dims[name]
        else:
            inferred = _infer_dims(arr.shape[2:], n_source, len(bands), n_latent, name)
            if inferred is not None:
                var_dims[name] = inferred
        posterior[name] = arr

    if source_ids is None:
        ids = list(range(n_source))
    else:
        ids = list(np.asarray(source_ids).tolist())
        if len(ids) != n_source:
            raise ArgumentError("source_ids", ids, f"{len(ids)} ids given for {n_source} "
                                "sources in draws['flux']")
        if len(set(ids)) != len(ids):
            raise ArgumentError("source_ids", ids, "ids must be unique")

    psf = np.asarray(scene.psf)
    coords: dict[str, Any] = {
        "source": ids, "band": bands, "y": np.arange(ny), "x": np.arange(nx), "xy": ["x", "y"],
        "psf_y": np.arange(psf.shape[-2]), "psf_x": np.arange(psf.shape[-1]),
    }
    if n_latent is not None:
        coords[LATENT_DIM] = np.arange(n_latent)

    stats = None
    if sample_stats:
        stats = {k: _array(v, f"sample_stats[{k!r}]", lead, 2) for k, v in sample_stats.items()}

    observed = {"image": np.asarray(scene.image)}
    constant = {"variance": np.asarray(scene.variance), "psf": psf,
                "psf_flux_fraction": np.asarray(scene.psf_flux_fraction, np.float64)}
    for g in ("observed_data", "constant_data"):
        for name, v in _schema(g).items():
            var_dims.setdefault(name, list(v.dims))
    if positions_given is not None:
        pos = np.asarray(positions_given, dtype=np.float64)
        if pos.shape != (n_source, 2):
            raise ArgumentError("positions_given", pos.shape,
                                f"expected shape (source={n_source}, 2) of (x, y)")
        constant["position_given"] = pos

    meta: dict[str, Any] = {
        "method": str(method),
        "inference_library": str(library),
        "inference_library_version": _version(library),
        "probdeblend_version": _version("probdeblend"),
        "units": scene.units,
        "pixel_scale": float(scene.pixel_scale),
        "bands": ",".join(bands),
        "conventions": CONVENTIONS,
    }

    predictive = None
    if posterior_predictive is not None:
        pp = _array(posterior_predictive, "posterior_predictive", None, 5)
        _expect(pp, "posterior_predictive", (len(bands), ny, nx), "band, y, x")
        if pp.shape[0] != lead[0]:
            raise ArgumentError("posterior_predictive", pp.shape,
                                f"{pp.shape[0]} chains, the posterior has {lead[0]}")
        index = np.arange(lead[1]) if predictive_draws is None else np.asarray(
            predictive_draws, dtype=int)
        if index.shape != (pp.shape[1],) or (len(index) and (index.min() < 0
                                                             or index.max() >= lead[1])):
            raise ArgumentError(
                "posterior_predictive", pp.shape,
                f"{pp.shape[1]} predictive draws for {lead[1]} posterior draws: pass one per "
                "posterior draw (aligned), or predictive_draws= their posterior draw indices")
        predictive = {"image": pp}
        meta["n_predictive"] = int(pp.shape[1])

    loglik = None
    if log_likelihood is not None:
        ll = _array(log_likelihood, "log_likelihood", lead, 3)
        if ll.shape[2:] == (len(bands), ny, nx):
            level = pointwise_level(lead[0], lead[1], scene, max_pointwise)
            if level == "band":
                ll = ll.sum(axis=(-2, -1))
                meta["log_likelihood_note"] = (
                    f"per-pixel log-likelihood ({ll.size * ny * nx} values) exceeds "
                    f"max_pointwise={max_pointwise}: summed over the pixels of each band, so "
                    "az.loo treats bands as the observations")
        elif ll.shape[2:] == (len(bands),):
            level = "band"
            meta["log_likelihood_note"] = "given per band by the producer"
        else:
            raise ArgumentError(
                "log_likelihood", ll.shape, f"expected (chain, draw, band, y, x) = (..., "
                f"{len(bands)}, {ny}, {nx}) per pixel or (chain, draw, band={len(bands)}) "
                f"per band, got {ll.shape}")
        loglik = {"image": ll}
        meta["log_likelihood_level"] = level
        var_dims_ll = ["band", "y", "x"] if level == "pixel" else ["band"]

    for k, v in dict(attrs or {}).items():
        if v is not None:
            meta[str(k)] = _attr_value(v)

    # log_likelihood.image may have other dims than observed_data.image (per band): its own
    # dataset.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(
            posterior=posterior, sample_stats=stats, observed_data=observed,
            constant_data=constant, posterior_predictive=predictive, coords=coords,
            dims=var_dims, attrs=dict(meta), posterior_attrs=dict(meta))
    if loglik is not None:
        ll_ds = az.dict_to_dataset(loglik, coords=coords, dims={"image": var_dims_ll},
                                   attrs=dict(meta))
        idata.add_groups({"log_likelihood": ll_ds.assign_coords(
            chain=idata.posterior.chain, draw=idata.posterior.draw)})
    if predictive is not None and predictive_draws is not None:
        idata.posterior_predictive = idata.posterior_predictive.assign_coords(
            draw=np.asarray(predictive_draws, dtype=int))
    if source_images_mean is not None or source_images_std is not None:
        idata.add_groups({"deblended": _deblended(
            source_images_mean, source_images_std, (n_source, len(bands), ny, nx), coords, meta)},
            warn_on_custom_groups=False)
    _set_units(idata, scene.units)
    return idata


def _deblended(mean, std, shape, coords, meta):
    import xarray as xr

    data = {}
    for name, value in (("image", mean), ("image_std", std)):
        if value is None:
            continue
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape != shape:
            arg = "source_images_mean" if name == "image" else "source_images_std"
            raise ArgumentError(arg, arr.shape, f"expected shape (source, band, y, x) = {shape}")
        data[name] = (("source", "band", "y", "x"), arr)
    c = {k: coords[k] for k in ("source", "band", "y", "x")}
    return xr.Dataset(data, coords=c, attrs={k: meta[k] for k in ("units", "conventions")})


def _set_units(idata, units: str) -> None:
    """``units`` / ``description`` attrs on every schema variable present."""
    for v in SCHEMA:
        group = getattr(idata, v.group, None) if v.group in idata.groups() else None
        if group is None or v.name not in group:
            continue
        da = group[v.name]
        if v.unit:
            da.attrs["units"] = v.unit.format(units=units)
        da.attrs["description"] = v.doc.format(units=units)
