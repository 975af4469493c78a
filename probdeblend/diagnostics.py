"""Reading posterior results: summaries, convergence checks, plots.

The results themselves are :class:`arviz.InferenceData` built by
:func:`probdeblend.results.build_inference_data` (schema, dims and conventions there;
:func:`to_inference_data` is kept here as a thin alias). :func:`summary_table` condenses a
result into one catalogue row per source, :func:`check_convergence` checks R-hat, ESS and
divergences and warns loudly, and :func:`plot_scene`, :func:`plot_corner` and
:func:`plot_trace` draw the usual figures. See :doc:`/diagnostics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Table

from .results import CONVENTIONS, LATENT_DIM, build_inference_data
from .results import arviz as _arviz

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


class ConvergenceWarning(UserWarning):
    """MCMC diagnostics (R-hat, ESS, divergences) show the posterior draws are not reliable."""


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
    """Compatibility alias of :func:`probdeblend.results.build_inference_data`.

    ``attrs["method"]`` and ``attrs["inference_library"]`` (if given) become its ``method`` and
    ``library``; ``predictive_draw_index`` is its ``predictive_draws``.

    Legacy contract, kept until its callers (``fit``, ``deblend``) move to the builder: the
    positions keep the caller's names (``x`` / ``y`` when given so), a per-band log-likelihood
    is the variable ``obs``, and there is **no** ``constant_data`` group (those callers add their
    own; ``add_groups`` fails on an existing group). New code calls
    :func:`~probdeblend.results.build_inference_data` for the full schema.
    """
    attrs = dict(attrs or {})
    idata = build_inference_data(
        draws, scene, method=attrs.get("method", "unspecified"),
        library=attrs.get("inference_library", "probdeblend"), source_ids=source_ids,
        sample_stats=sample_stats, log_likelihood=log_likelihood,
        posterior_predictive=posterior_predictive, predictive_draws=predictive_draw_index,
        attrs=attrs, dims=dims)
    del idata.constant_data
    legacy = {k + "_pix": k for k in ("x", "y") if k in draws}
    if legacy:
        idata.posterior = idata.posterior.rename(legacy)
    if "log_likelihood" in idata.groups() and idata.attrs.get("log_likelihood_level") == "band":
        idata.log_likelihood = idata.log_likelihood.rename({"image": "obs"})
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


class _SigFigs(str):
    """Column format: ``digits`` significant figures written positionally (``12350``,
    ``0.001235``). A ``str`` (``"{:.4g}"``) so that FITS writers turn it into a TDISP keyword."""

    def __new__(cls, digits: int):
        out = super().__new__(cls, f"{{:.{int(digits)}g}}")
        out.digits = int(digits)
        return out

    def format(self, value, *args, **kwargs) -> str:  # what astropy calls to print a value
        if np.ma.is_masked(value):
            return "--"
        v = float(value)
        if not np.isfinite(v):
            return str(v)
        return np.format_float_positional(v, precision=self.digits, unique=False,
                                          fractional=False, trim="-")


#: Display formats of :func:`summary_table` columns (values keep full precision).
_FORMATS = {"x": "{:.2f}", "y": "{:.2f}", "e1": "{:.3f}", "e1_err": "{:.3f}", "e2": "{:.3f}",
            "e2_err": "{:.3f}", "r_hat": "{:.3f}", "ess_bulk": "{:.0f}", "pareto_k": "{:.2f}",
            "e_failed": "{:.2f}"}


def summary_table(idata, pareto_k: Any = None) -> Table:
    """One catalogue row per source: posterior means, standard deviations and diagnostics.

    Parameters
    ----------
    idata : arviz.InferenceData
        From :func:`probdeblend.results.build_inference_data` (or :func:`probdeblend.fit`).
    pareto_k : float or array (source,), optional
        Pareto k-hat of importance reweighting, per source or one for the scene (broadcast).
        Default: ``idata.attrs["pareto_k"]`` when the result has it.

    Returns
    -------
    astropy.table.Table
        Columns ``id``; ``x``, ``y`` (posterior means of ``x_pix`` / ``y_pix``, pix); per band
        ``flux_<band>`` (mean), ``flux_<band>_err`` (standard deviation, ddof=1),
        ``flux_<band>_lo`` / ``_hi`` (16th / 84th percentiles), in the scene's units; ``e1``,
        ``e1_err``, ``e2``, ``e2_err``; ``r_hat`` (the largest rank-normalised split R-hat over
        the source's flux, e1 and e2; NaN for a single chain), ``ess_bulk`` (the smallest bulk
        ESS over the same) and ``pareto_k`` if known. Statistics pool all chains and draws.
        Values keep full precision; printing rounds them (flux to 4 significant figures, its
        error to 3, e1 / e2 to 3 decimals, positions to 2).
    """
    az = _arviz()
    post = idata.posterior
    ids = list(post.coords["source"].values)
    n_source = len(ids)
    n_chain = post.sizes["chain"]
    unit = _unit(idata)
    if pareto_k is None:
        pareto_k = idata.attrs.get("pareto_k", post.attrs.get("pareto_k"))

    def pooled(name):
        da = post[name]
        other = [d for d in da.dims if d not in ("chain", "draw", "source")]
        vals = np.asarray(da.transpose("chain", "draw", "source", *other).values, dtype=float)
        return vals.reshape((-1,) + vals.shape[2:])

    t = Table()
    t["id"] = ids
    for col, name in (("x", "x_pix"), ("y", "y_pix")):
        name = name if name in post else col  # results of the legacy to_inference_data
        if name in post:
            t[col] = pooled(name).mean(0)
            t[col].unit = u.pix
    flux = pooled("flux")
    for k, band in enumerate(post.coords["band"].values):
        f = flux[:, :, k]
        t[f"flux_{band}"] = f.mean(0)
        t[f"flux_{band}_err"] = f.std(0, ddof=1) if len(f) > 1 else np.full(n_source, np.nan)
        t[f"flux_{band}_lo"] = np.percentile(f, 16, axis=0)
        t[f"flux_{band}_hi"] = np.percentile(f, 84, axis=0)
        for suffix in ("", "_err", "_lo", "_hi"):
            col = t[f"flux_{band}{suffix}"]
            col.info.format = _SigFigs(3 if suffix == "_err" else 4)
            if unit is not None:
                col.unit = unit
    failed = np.zeros(n_source)
    for name in ("e1", "e2"):
        v = pooled(name)
        bad = ~np.isfinite(v)
        failed = np.maximum(failed, bad.mean(0))
        with warnings.catch_warnings():  # summaries over the draws whose shape was measured
            warnings.simplefilter("ignore", RuntimeWarning)
            t[name] = np.nanmean(v, 0)
            t[f"{name}_err"] = (np.nanstd(v, 0, ddof=1) if len(v) > 1
                                else np.full(n_source, np.nan))
    t["e_failed"] = failed  # fraction of draws whose shape measurement failed

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
    for col, fmt in _FORMATS.items():
        if col in t.colnames:
            t[col].info.format = fmt
    t.meta["units"] = idata.posterior.attrs.get("units", "")
    t.meta["conventions"] = idata.posterior.attrs.get("conventions", CONVENTIONS)
    return t


def check_convergence(idata, r_hat_max: float = 1.01, ess_min: float = 400, warn: bool = True,
                      var_names: Sequence[str] = ("flux", "e1", "e2", "x_pix", "y_pix", "x",
                                                  "y")) -> dict:
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
        n_nan = int(np.sum(~np.isfinite(np.asarray(post[name].values, dtype=float))))
        if n_nan:
            failures.append(
                f"{name}: {n_nan} draw(s) are NaN (e.g. shapes that could not be measured), so "
                f"its R-hat / ESS could not be checked on all draws; see attrs "
                f"'e_failed_fraction' and the summary's e_failed column"
            )
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
    aliases = {"e1": ("e1", "g1"), "e2": ("e2", "g2"), "x_pix": ("x_pix", "x"),
               "y_pix": ("y_pix", "y")}
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
