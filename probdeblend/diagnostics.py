"""Posterior results as ArviZ InferenceData: conversion, summaries, convergence checks, plots.

:func:`to_inference_data` turns posterior draws of a scene into an :class:`arviz.InferenceData`
with named dimensions ``source`` (coordinates: source ids), ``band`` (band names) and
``latent_dim`` (latent-space index) so that every ArviZ function works on it (``az.summary``,
``az.plot_trace``, ``az.rhat``, ...).
:func:`summary_table` condenses it into one catalogue row per source, :func:`check_convergence`
checks R-hat, ESS and divergences and warns loudly, and :func:`plot_scene`,
:func:`plot_corner` and :func:`plot_trace` draw the usual figures. See :doc:`/diagnostics`.

Conventions (stored in the ``conventions`` attribute of the result)
------------------------------------------------------------------
``e1, e2``
    GalSim reduced shear ``g`` of the PSF-free galaxy (:mod:`probdeblend.measure`).
``x, y``
    0-based pixel centres of the scene (the centre of ``image[b, j, i]`` is ``(x=i, y=j)``).
``flux``
    Total flux of the PSF-convolved galaxy in each band, in the scene's image units
    (``scene.units``; PSF convolution conserves flux, so it is also the PSF-free galaxy's).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Table

__all__ = [
    "ConvergenceWarning",
    "to_inference_data",
    "summary_table",
    "check_convergence",
    "plot_scene",
    "plot_corner",
    "plot_trace",
    "CONVENTIONS",
    "LATENT_DIM",
]

#: One-line statement of the units and conventions stored with every result.
CONVENTIONS = (
    "e1, e2: GalSim reduced shear of the PSF-free galaxy; x, y: 0-based pixel centres; "
    "flux: total flux of the PSF-convolved galaxy in image units"
)
#: Name of the latent-space dimension. Not ``"latent"``: xarray turns a variable named like a
#: dimension into a coordinate, and the variable ``latent`` must stay a data variable.
LATENT_DIM = "latent_dim"
_REQUIRED = ("flux", "e1", "e2", "x", "y")
_PER_SOURCE_XY = ("position", "offset")  # (..., source, 2) extras with an (x, y) axis


class ConvergenceWarning(UserWarning):
    """MCMC diagnostics (R-hat, ESS, divergences) show the posterior draws are not reliable."""


def _arviz():
    """Import ArviZ without its import-time migration FutureWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def _version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def _as_draws(value: Any, name: str, lead: tuple[int, ...] | None, min_ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimensions with leading (chain, draw), got "
            f"shape {arr.shape}; add a chain axis with x[None] for a single chain"
        )
    if lead is not None and arr.shape[:2] != lead:
        raise ValueError(
            f"{name}: leading (chain, draw) shape {arr.shape[:2]} differs from draws['flux']'s "
            f"{lead}"
        )
    return arr


def to_inference_data(
    draws: Mapping[str, Any],
    sample_stats: Mapping[str, Any] | None,
    scene,
    source_ids: Sequence[Any] | None = None,
    posterior_predictive: Any = None,
    log_likelihood: Any = None,
    attrs: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    predictive_draw_index: Sequence[int] | None = None,
):
    """Posterior draws of a scene as :class:`arviz.InferenceData`.

    Parameters
    ----------
    draws : dict of str -> array
        Posterior draws, every array with leading dimensions ``(chain, draw)``. Required:
        ``flux`` (chain, draw, source, band) in scene units, ``e1``, ``e2``, ``x``, ``y``
        (chain, draw, source). Usual: ``latent`` (chain, draw, source, D), stored with dims
        ``(source, latent_dim)``. Any extra variable is stored too; its dims are inferred from
        its shape: ``(source,)``, ``(source, band)``, ``(source, latent_dim)``, ``(source, xy)``
        for ``position``/``offset`` (coordinates ``"x", "y"``), otherwise ArviZ's default names
        (override with ``dims``).
    sample_stats : dict of str -> array (chain, draw), or None
        Engine statistics passed through unchanged (ArviZ names: ``lp``, ``diverging``,
        ``acceptance_rate``, ``tree_depth``, ``n_steps``, ...).
    scene : probdeblend.Scene
        The fitted observation: gives the band names, the ``observed_data`` group and units.
    source_ids : sequence, optional
        Coordinates of the ``source`` dimension (default ``0 .. S-1``); must be unique.
    posterior_predictive : array (chain, draw', band, y, x) or dict, optional
        Replicated images (noisy draws from the likelihood given posterior draws), stored as
        variable ``image``; a dict may hold more variables. It is usually computed for a thinned
        subset of draws, so ``draw'`` may be shorter than the posterior's ``draw``: its ``draw``
        coordinate is ``0 .. draw'-1`` unless ``predictive_draw_index`` gives the posterior draw
        index of each.
    log_likelihood : array (chain, draw, band) or dict, optional
        Stored as variable ``obs`` with dims ``(chain, draw, band)``: the log-likelihood of each
        draw **summed over the pixels of each band** (pixel-wise values would be
        ``n_band * ny * nx`` numbers per draw). ``az.loo`` / ``az.waic`` on it therefore treat
        bands as the observations, which is a coarse leave-one-band-out check, not pixel LOO.
    attrs : dict, optional
        Extra attributes (e.g. ``method="nuts"``, ``prior="vae-lsst"``) stored on the result
        (``idata.attrs``) and on the posterior group; values should be str or numbers.
    dims : dict of str -> list of str, optional
        Dimension names (after chain, draw) for extra variables whose dims cannot be inferred.
    predictive_draw_index : sequence of int, optional
        For a thinned ``posterior_predictive``: the posterior ``draw`` index of each of its draws.

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior``, ``sample_stats`` (if given), ``observed_data`` (``image`` and
        ``variance``, dims ``(band, y, x)``, ``inf`` variance = masked), and, if given,
        ``posterior_predictive`` and ``log_likelihood``. Attributes: ``method``, ``prior``,
        ``probdeblend_version``, ``units``, ``pixel_scale``, ``bands``, ``conventions``.

    Raises
    ------
    ValueError
        A required variable is missing or shapes disagree (the message names the variable).
    """
    az = _arviz()
    if not isinstance(draws, Mapping):
        raise TypeError(f"draws: expected a dict of arrays, got {type(draws).__name__}")
    missing = [k for k in _REQUIRED if k not in draws]
    if missing:
        raise ValueError(
            f"draws: missing required variable(s) {missing}; expected {list(_REQUIRED)} with "
            "shapes flux (chain, draw, source, band) and e1, e2, x, y (chain, draw, source)"
        )
    bands = list(scene.bands)
    flux = _as_draws(draws["flux"], "draws['flux']", None, 4)
    lead = flux.shape[:2]
    n_source = flux.shape[2]
    if flux.ndim != 4 or flux.shape[3] != len(bands):
        raise ValueError(
            f"draws['flux']: expected shape (chain, draw, source, band={len(bands)}) for bands "
            f"{bands}, got {flux.shape}"
        )
    ny, nx = scene.shape
    n_latent = None
    if "latent" in draws:
        lat = _as_draws(draws["latent"], "draws['latent']", lead, 4)
        n_latent = lat.shape[3]

    posterior: dict[str, np.ndarray] = {}
    var_dims: dict[str, list[str]] = {}
    user_dims = {k: list(v) for k, v in (dims or {}).items()}
    for name, value in draws.items():
        arr = _as_draws(value, f"draws[{name!r}]", lead, 2)
        rest = arr.shape[2:]
        if name in _REQUIRED[1:] and rest != (n_source,):
            raise ValueError(
                f"draws[{name!r}]: expected shape (chain, draw, source={n_source}), got "
                f"{arr.shape}"
            )
        posterior[name] = arr
        if name in user_dims:
            var_dims[name] = user_dims[name]
        elif name == "flux":
            var_dims[name] = ["source", "band"]
        elif name == "latent":
            var_dims[name] = ["source", LATENT_DIM]
        elif rest == ():
            var_dims[name] = []
        elif rest == (n_source,):
            var_dims[name] = ["source"]
        elif len(rest) == 2 and rest[0] == n_source:
            if name in _PER_SOURCE_XY and rest[1] == 2:
                var_dims[name] = ["source", "xy"]
            elif "latent" in name and rest[1] == n_latent:
                var_dims[name] = ["source", LATENT_DIM]
            elif rest[1] == len(bands):
                var_dims[name] = ["source", "band"]
            elif rest[1] == n_latent:
                var_dims[name] = ["source", LATENT_DIM]

    if source_ids is None:
        ids = list(range(n_source))
    else:
        ids = list(np.asarray(source_ids).tolist())
        if len(ids) != n_source:
            raise ValueError(
                f"source_ids: {len(ids)} ids given for {n_source} sources in draws['flux']"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"source_ids: ids must be unique, got {ids}")

    coords: dict[str, Any] = {
        "source": ids,
        "band": bands,
        "y": np.arange(ny),
        "x": np.arange(nx),
        "xy": ["x", "y"],
    }
    if n_latent is not None:
        coords[LATENT_DIM] = np.arange(n_latent)

    stats = None
    if sample_stats:
        stats = {}
        for name, value in sample_stats.items():
            stats[name] = _as_draws(value, f"sample_stats[{name!r}]", lead, 2)

    observed = {
        "image": np.asarray(scene.image),
        "variance": np.asarray(scene.variance),
    }
    var_dims["image"] = ["band", "y", "x"]
    var_dims["variance"] = ["band", "y", "x"]

    predictive = None
    if posterior_predictive is not None:
        if not isinstance(posterior_predictive, Mapping):
            posterior_predictive = {"image": posterior_predictive}
        predictive = {}
        for name, value in posterior_predictive.items():
            arr = _as_draws(value, f"posterior_predictive[{name!r}]", None, 2)
            if name == "image" and arr.shape[2:] != (len(bands), ny, nx):
                raise ValueError(
                    f"posterior_predictive['image']: expected shape (chain, draw, "
                    f"{len(bands)}, {ny}, {nx}), got {arr.shape}"
                )
            if arr.shape[0] != lead[0]:
                raise ValueError(
                    f"posterior_predictive[{name!r}]: {arr.shape[0]} chains, the posterior has "
                    f"{lead[0]}"
                )
            predictive[name] = arr

    loglik = None
    if log_likelihood is not None:
        if not isinstance(log_likelihood, Mapping):
            log_likelihood = {"obs": log_likelihood}
        loglik = {}
        for name, value in log_likelihood.items():
            arr = _as_draws(value, f"log_likelihood[{name!r}]", lead, 2)
            if name == "obs" and arr.shape[2:] != (len(bands),):
                raise ValueError(
                    f"log_likelihood['obs']: expected shape (chain, draw, band={len(bands)}) "
                    f"(per-band summed log-likelihood), got {arr.shape}"
                )
            loglik[name] = arr
            if name == "obs":
                var_dims["obs"] = ["band"]

    meta: dict[str, Any] = {
        "method": "unspecified",
        "prior": "unspecified",
        "probdeblend_version": _version(),
        "units": scene.units,
        "pixel_scale": float(scene.pixel_scale),
        "bands": ",".join(bands),
        "conventions": CONVENTIONS,
    }
    meta.update(dict(attrs or {}))

    idata = az.from_dict(
        posterior=posterior,
        sample_stats=stats,
        observed_data=observed,
        posterior_predictive=predictive,
        log_likelihood=loglik,
        coords=coords,
        dims=var_dims,
        attrs=dict(meta),
        posterior_attrs=dict(meta),
    )
    if predictive is not None and predictive_draw_index is not None:
        index = np.asarray(predictive_draw_index, dtype=int)
        n_pp = idata.posterior_predictive.sizes["draw"]
        if index.shape != (n_pp,):
            raise ValueError(
                f"predictive_draw_index: expected {n_pp} indices (one per predictive draw), got "
                f"shape {index.shape}"
            )
        idata.posterior_predictive = idata.posterior_predictive.assign_coords(draw=index)
    return idata


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def _unit(idata) -> u.UnitBase | None:
    name = idata.posterior.attrs.get("units")
    if not name:
        return None
    return u.Unit(name, parse_strict="silent")


def _per_source_reduce(ds, names, reducer, default=np.nan):
    """Reduce diagnostics of ``names`` (each with a ``source`` dim) to one value per source."""
    out = None
    for name in names:
        if name not in ds:
            continue
        da = ds[name]
        other = [d for d in da.dims if d != "source"]
        vals = np.asarray(da.transpose("source", *other).values, dtype=float)
        vals = vals.reshape(vals.shape[0], -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
            red = reducer(vals, axis=1)
        out = red if out is None else reducer(np.stack([out, red], 1), axis=1)
    if out is None:
        return np.full(ds.sizes.get("source", 0), default)
    return out


def summary_table(idata, pareto_k: Any = None) -> Table:
    """One catalogue row per source: posterior means, standard deviations and diagnostics.

    Parameters
    ----------
    idata : arviz.InferenceData
        From :func:`to_inference_data`.
    pareto_k : float or array (source,), optional
        Pareto k-hat of importance reweighting, per source or one for the scene (broadcast).

    Returns
    -------
    astropy.table.Table
        Columns ``id``; ``x``, ``y`` (posterior means, pix); per band ``flux_<band>`` (mean),
        ``flux_<band>_err`` (standard deviation, ddof=1), ``flux_<band>_lo`` / ``_hi`` (16th /
        84th percentiles), in the scene's units; ``e1``, ``e1_err``, ``e2``, ``e2_err``;
        ``r_hat`` (the largest rank-normalised split R-hat over the source's flux, e1 and e2;
        NaN for a single chain), ``ess_bulk`` (the smallest bulk ESS over the same) and
        ``pareto_k`` if given. Statistics pool all chains and draws.
    """
    az = _arviz()
    post = idata.posterior
    ids = list(post.coords["source"].values)
    n_source = len(ids)
    n_chain = post.sizes["chain"]
    unit = _unit(idata)

    def pooled(name):
        da = post[name]
        other = [d for d in da.dims if d not in ("chain", "draw", "source")]
        vals = np.asarray(da.transpose("chain", "draw", "source", *other).values, dtype=float)
        return vals.reshape((-1,) + vals.shape[2:])

    t = Table()
    t["id"] = ids
    for name in ("x", "y"):
        if name in post:
            t[name] = pooled(name).mean(0)
            t[name].unit = u.pix
    flux = pooled("flux")
    for k, band in enumerate(post.coords["band"].values):
        f = flux[:, :, k]
        t[f"flux_{band}"] = f.mean(0)
        t[f"flux_{band}_err"] = f.std(0, ddof=1) if len(f) > 1 else np.full(n_source, np.nan)
        t[f"flux_{band}_lo"] = np.percentile(f, 16, axis=0)
        t[f"flux_{band}_hi"] = np.percentile(f, 84, axis=0)
        if unit is not None:
            for suffix in ("", "_err", "_lo", "_hi"):
                t[f"flux_{band}{suffix}"].unit = unit
    for name in ("e1", "e2"):
        v = pooled(name)
        t[name] = v.mean(0)
        t[f"{name}_err"] = v.std(0, ddof=1) if len(v) > 1 else np.full(n_source, np.nan)

    names = ["flux", "e1", "e2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz: "Shape validation failed" for tiny inputs
        if n_chain > 1:
            rhat = az.rhat(idata, var_names=names)
            t["r_hat"] = _per_source_reduce(rhat, names, np.nanmax)
        else:
            t["r_hat"] = np.full(n_source, np.nan)
        ess = az.ess(idata, var_names=names, method="bulk")
        t["ess_bulk"] = _per_source_reduce(ess, names, np.nanmin)
    if pareto_k is not None:
        k = np.broadcast_to(np.asarray(pareto_k, dtype=float), (n_source,)).copy()
        t["pareto_k"] = k
    t.meta["units"] = idata.posterior.attrs.get("units", "")
    t.meta["conventions"] = idata.posterior.attrs.get("conventions", CONVENTIONS)
    return t


def check_convergence(idata, r_hat_max: float = 1.01, ess_min: float = 400, warn: bool = True,
                      var_names: Sequence[str] = ("flux", "e1", "e2", "x", "y")) -> dict:
    """Check R-hat, bulk ESS and divergences; warn once, loudly, listing every failure.

    Parameters
    ----------
    idata : arviz.InferenceData
    r_hat_max : float, default 1.01
        Largest acceptable rank-normalised split R-hat (Vehtari et al. 2021).
    ess_min : float, default 400
        Smallest acceptable bulk effective sample size (100 per chain for 4 chains).
    warn : bool, default True
        Emit a :class:`ConvergenceWarning` when a check fails.
    var_names : sequence of str
        Posterior variables checked (those present).

    Returns
    -------
    dict
        ``r_hat`` and ``ess_bulk``: dict variable -> worst value (max R-hat, min ESS; R-hat is
        ``None`` with a single chain), ``n_divergent`` (int, or ``None`` without a
        ``diverging`` statistic), ``n_chains``, ``n_draws``, ``failures`` (list of str),
        ``notes`` (list of str) and ``ok`` (bool).
    """
    az = _arviz()
    post = idata.posterior
    names = [n for n in var_names if n in post]
    n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
    result: dict[str, Any] = {"r_hat": {}, "ess_bulk": {}, "n_divergent": None,
                              "n_chains": int(n_chain), "n_draws": int(n_draw),
                              "failures": [], "notes": []}
    failures: list[str] = result["failures"]

    def worst(da, pick_max):
        vals = np.asarray(da.values, dtype=float)
        if vals.size == 0 or np.all(np.isnan(vals)):
            return np.nan, {}
        flat = int(np.nanargmax(vals) if pick_max else np.nanargmin(vals))
        idx = np.unravel_index(flat, vals.shape)
        where = {d: da.coords[d].values[i].item() for d, i in zip(da.dims, idx, strict=True)}
        return float(vals[idx]), where

    def label(name, where):
        inner = ", ".join(f"{d}={v!r}" for d, v in where.items())
        return f"{name}[{inner}]" if inner else name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(idata, var_names=names) if n_chain > 1 and names else None
        ess = az.ess(idata, var_names=names, method="bulk") if names else None
    if rhat is None:
        result["notes"].append(
            f"R-hat skipped: it needs at least 2 chains, got {n_chain}; run several chains "
            "from dispersed starting points to check mixing"
        )
    for name in names:
        if rhat is not None:
            val, where = worst(rhat[name], True)
            result["r_hat"][name] = val
            if np.isfinite(val) and val > r_hat_max:
                n_bad = int(np.sum(np.asarray(rhat[name].values) > r_hat_max))
                failures.append(
                    f"R-hat {label(name, where)} = {val:.3f} > {r_hat_max} "
                    f"({n_bad} element(s) of {name} fail)"
                )
        else:
            result["r_hat"][name] = None
        val, where = worst(ess[name], False)
        result["ess_bulk"][name] = val
        if np.isfinite(val) and val < ess_min:
            n_bad = int(np.sum(np.asarray(ess[name].values) < ess_min))
            failures.append(
                f"bulk ESS {label(name, where)} = {val:.0f} < {ess_min:g} "
                f"({n_bad} element(s) of {name} fail)"
            )

    stats = getattr(idata, "sample_stats", None)
    if stats is not None and "diverging" in stats:
        n_div = int(np.asarray(stats["diverging"].values, dtype=bool).sum())
        result["n_divergent"] = n_div
        if n_div:
            failures.append(
                f"{n_div} divergent transition(s) out of {n_chain * n_draw} draws: the sampler "
                "missed regions of high curvature, so the draws may be biased"
            )
    result["ok"] = not failures
    if failures and warn:
        advice = []
        if result["n_divergent"]:
            advice.append("raise target_accept (e.g. 0.9-0.95) or improve the preconditioning")
        advice.append("draw more samples / more chains (num_samples, num_chains)")
        advice.append("look at az.plot_trace(idata) for stuck or separated chains")
        warnings.warn(
            "posterior draws failed convergence checks "
            f"({n_chain} chain(s) x {n_draw} draws):\n  - " + "\n  - ".join(failures)
            + "\nSuggestions: " + "; ".join(advice) + ".",
            ConvergenceWarning,
            stacklevel=2,
        )
    return result


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, plt, path):
    if path is not None:
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)
    return fig


def _source_index(post, source):
    ids = list(post.coords["source"].values)
    if source in ids:
        return ids.index(source)
    raise ValueError(f"source: {source!r} is not a source id of this result; ids are {ids}")


def plot_scene(scene, model, path=None, positions=None, bands=("i", "r", "g")):
    """Observed colour composite, model composite and residual in sigma, side by side.

    Parameters
    ----------
    scene : probdeblend.Scene
    model : array (band, ny, nx)
        Model image in the scene's units (e.g. the posterior-mean scene).
    path : str or Path, optional
        Write the figure there (PNG, PDF, ... from the suffix) with the Agg backend.
    positions : array (n, 2), optional
        ``(x, y)`` markers (default ``scene.positions``).
    bands : 3 band names
        Red, green, blue of the composites (missing names fall back to reddest / middle /
        bluest band). Both composites share one asinh stretch, set by the model.

    Returns
    -------
    matplotlib.figure.Figure
        The residual panel shows ``(image - model) * sqrt(weight)`` of the r band (or the middle
        band) clipped to +-5 sigma; masked pixels are blank.
    """
    from .plotting import rgb_composite

    model = np.asarray(model, dtype=float)
    if model.shape != scene.image.shape:
        raise ValueError(
            f"model: expected shape {scene.image.shape} like scene.image, got {model.shape}"
        )
    plt = _pyplot(path)
    names = list(scene.bands)
    idx = [names.index(b) if b in names else [len(names) - 1, len(names) // 2, 0][k]
           for k, b in enumerate(bands)]
    ref = model if np.any(model[idx] > 0) else np.asarray(scene.image, dtype=float)
    stretch = max(float(np.percentile(ref[idx].mean(0), 99.5)) / 8.0, 1e-12)
    mid = names.index("r") if "r" in names else len(names) // 2
    resid = (scene.image[mid] - model[mid]) * np.sqrt(scene.weight[mid])
    resid = np.where(scene.mask[mid], np.nan, resid)
    pos = scene.positions if positions is None else np.asarray(positions, float).reshape(-1, 2)

    fig, axes = plt.subplots(1, 3, figsize=(11.5, 4.0))
    rgb_name = "".join(names[i] for i in idx)
    axes[0].imshow(rgb_composite(scene.image, names, bands, stretch), origin="lower")
    axes[0].set_title(f"observed ({rgb_name})")
    axes[1].imshow(rgb_composite(model, names, bands, stretch), origin="lower")
    axes[1].set_title("model")
    im = axes[2].imshow(resid, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
    axes[2].set_title(f"residual {names[mid]} [sigma]")
    fig.colorbar(im, ax=axes[2], fraction=0.046, label="(image - model) / sigma")
    for ax in axes:
        if pos is not None and len(pos):
            ax.scatter(pos[:, 0], pos[:, 1], marker="+", color="yellow", s=50, linewidths=1)
        ax.set_xlim(-0.5, scene.shape[1] - 0.5)
        ax.set_ylim(-0.5, scene.shape[0] - 0.5)
        ax.set_xlabel("x [pix]")
    axes[0].set_ylabel("y [pix]")
    fig.tight_layout()
    return _finish(fig, plt, path)


def _truth_value(truth, key):
    if truth is None:
        return None
    aliases = {"e1": ("e1", "g1"), "e2": ("e2", "g2")}
    for k in aliases.get(key, (key,)):
        if k in truth:
            return float(truth[k])
    return None


def plot_corner(idata, source=0, var_names=("flux", "e1", "e2"), bands=("r",), truth=None,
                path=None):
    """Corner plot (pairwise hexbins and marginal histograms) of one source's posterior.

    Parameters
    ----------
    idata : arviz.InferenceData
    source : source id
        A coordinate of the ``source`` dimension.
    var_names : sequence of str
        Posterior variables; ``flux`` (or any variable with a ``band`` dim) contributes one
        panel per band in ``bands``.
    bands : sequence of str
        Bands shown for band-dependent variables.
    truth : dict or astropy Row, optional
        True values drawn as lines, keyed ``"flux_r"``, ``"e1"``, ``"e2"``, ``"x"``, ...;
        ``g1``/``g2`` (simulator truth tables) stand in for ``e1``/``e2``.
    path : str or Path, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    post = idata.posterior
    k = _source_index(post, source)
    src = post.coords["source"].values[k].item()
    if truth is not None and hasattr(truth, "colnames"):
        truth = {c: truth[c] for c in truth.colnames}
    columns, labels, keys = [], [], []
    for name in var_names:
        if name not in post:
            raise ValueError(f"var_names: {name!r} is not a posterior variable "
                             f"(have {list(post.data_vars)})")
        da = post[name].isel(source=k)
        if "band" in da.dims:
            have = list(da.coords["band"].values)
            for b in bands:
                if b not in have:
                    raise ValueError(f"bands: {b!r} is not a band of this result ({have})")
                columns.append(np.asarray(da.sel(band=b).values, float).ravel())
                labels.append(f"{name} [{b}]")
                keys.append(f"{name}_{b}")
        elif set(da.dims) <= {"chain", "draw"}:
            columns.append(np.asarray(da.values, float).ravel())
            labels.append(name)
            keys.append(name)
        else:
            raise ValueError(f"var_names: {name!r} has extra dims {da.dims}; corner plots take "
                             "scalar-per-source variables or band-dependent ones")
    plt = _pyplot(path)
    from matplotlib.ticker import MaxNLocator

    n = len(columns)
    fig, axes = plt.subplots(n, n, figsize=(2.4 * n + 0.6, 2.4 * n + 0.6), squeeze=False)
    truths = [_truth_value(truth, key) for key in keys]
    limits = []
    columns = [np.asarray(c, dtype=float) for c in columns]
    finite = np.all([np.isfinite(c) for c in columns], axis=0)  # drop draws with a failed shape
    columns = [c[finite] for c in columns]
    for col, tv in zip(columns, truths, strict=True):
        lo, hi = np.percentile(col, [0.5, 99.5]) if len(col) else (-1.0, 1.0)
        width = max(hi - lo, 1e-12 * max(abs(lo), 1.0), 1e-300)
        if tv is not None and lo - 3 * width <= tv <= hi + 3 * width:  # keep nearby truths
            lo, hi = min(lo, tv), max(hi, tv)
        pad = 0.05 * max(hi - lo, width)
        limits.append((lo - pad, hi + pad))

    def inside(i):
        return truths[i] is not None and limits[i][0] <= truths[i] <= limits[i][1]

    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                ax.hist(columns[i], bins=30, range=limits[i], histtype="stepfilled", color="C0",
                        alpha=0.6)
                ax.set_yticks([])
                if inside(i):
                    ax.axvline(truths[i], color="C3")
                elif truths[i] is not None:
                    ax.set_title(f"truth {truths[i]:.4g} off scale", fontsize=8, color="C3")
            else:
                ax.hexbin(columns[j], columns[i], gridsize=25, cmap="Blues", mincnt=1,
                          extent=(*limits[j], *limits[i]))
                if inside(j):
                    ax.axvline(truths[j], color="C3")
                if inside(i):
                    ax.axhline(truths[i], color="C3")
                if inside(i) and inside(j):
                    ax.plot(truths[j], truths[i], "s", color="C3", ms=4)
                ax.set_ylim(*limits[i])
            ax.set_xlim(*limits[j])
            ax.xaxis.set_major_locator(MaxNLocator(4))
            if i == n - 1:
                ax.set_xlabel(labels[j])
                ax.tick_params(axis="x", labelrotation=45)
            else:
                ax.set_xticklabels([])
            if i != j:
                ax.yaxis.set_major_locator(MaxNLocator(4))
                if j == 0:
                    ax.set_ylabel(labels[i])
                else:
                    ax.set_yticklabels([])
    fig.suptitle(f"source {src}")
    fig.tight_layout()
    return _finish(fig, plt, path)


def plot_trace(idata, source=0, path=None, band=None):
    """Trace plot (ArviZ ``az.plot_trace``) of flux (one band), e1 and e2 of one source.

    Parameters
    ----------
    idata : arviz.InferenceData
    source : source id
    path : str or Path, optional
    band : str, optional
        Flux band shown (default ``"r"``, else the middle band).

    Returns
    -------
    matplotlib.figure.Figure
    """
    az = _arviz()
    post = idata.posterior
    _source_index(post, source)
    have = list(post.coords["band"].values)
    if band is None:
        band = "r" if "r" in have else have[len(have) // 2]
    elif band not in have:
        raise ValueError(f"band: {band!r} is not a band of this result ({have})")
    plt = _pyplot(path)
    with warnings.catch_warnings():
        # ArviZ-internal warnings (matplotlib API deprecations, small-sample notes)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = az.plot_trace(idata, var_names=["flux", "e1", "e2"],
                             coords={"source": [source], "band": [band]}, compact=False)
    fig = np.asarray(axes).ravel()[0].figure
    fig.suptitle(f"source {source!r}, flux band {band}")
    fig.tight_layout()
    return _finish(fig, plt, path)
