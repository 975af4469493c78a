"""Source catalogues of :func:`probdeblend.deblend`: schema, posterior summaries, FITS / Parquet.

One row per source, each source reported exactly once (by the blend group that owns it).
Columns (``B`` = the bands of the scene, in order; units in brackets):

Identity and position
    ``id`` (int, unique within the image), ``group`` (int, blend group id), ``group_size``
    (number of sources in the group), ``x``, ``y`` [pix] (posterior mean; 0-based pixel centres,
    the :class:`~probdeblend.Scene` convention: the centre of ``image[b, j, i]`` is
    ``(x=i, y=j)``), ``x_err``, ``y_err`` [pix] (posterior width, see below), ``pos_err`` [pix]
    (``sqrt((x_err**2 + y_err**2) / 2)``), ``ra``, ``dec`` [deg] (from the scene's WCS at the
    posterior-mean position; only when the scene has a WCS), ``x_init``, ``y_init`` [pix]
    (detection / input position), ``snr_det`` (detection S/N, NaN for input positions),
    ``det_pass`` (0: detected in the image, 1: in the residual of the first pass' model, -1:
    input position).
Fluxes (per band ``b``) [scene units, e.g. electron]
    ``flux_b`` (posterior mean of the total flux), ``flux_b_err`` (posterior width, see
    below), ``flux_b_q16``, ``flux_b_q50``, ``flux_b_q84`` (posterior quantiles). The
    amortized catalogue's flux posterior has heavy tails (its error model is Student-t with
    ~3 degrees of freedom, :mod:`probdeblend.photometry`): ``flux_b_q50`` is the robust
    point estimate (the mean of a few hundred heavy-tailed draws carries Monte-Carlo noise of
    ~0.15 ``flux_b_err``). Fluxes can be <= 0 (a source consistent with zero flux).
Ellipticity (GalSim reduced shear of the PSF-free galaxy, :mod:`probdeblend.measure`)
    ``e1``, ``e2`` (mean), ``e1_err``, ``e2_err`` (width), ``e1_q16`` ... ``e2_q84``.
    ``e_draws_from`` says where the ellipticity draws come from: ``"q"`` (the amortized q's
    joint draws from its shape head, the default), ``"posterior"`` (one shape per refined
    posterior draw) or ``"q_mean"`` (an encoder without a shape head: the shape of the q-mean
    latent only; width 0 and all quantiles equal; not an uncertainty).
Widths
    Every ``*_err`` column is half the 16-84 % range of the source's posterior draws: the
    standard deviation for a Gaussian posterior, and, unlike the draws' standard deviation,
    stable for heavy-tailed ones (schema 2; schema 1 gave the standard deviation, whose
    Monte-Carlo scatter over 200 Student-t(3) draws reached +-60 %).
Inference and diagnostics
    ``blendedness`` (``1 - <m_s, m_s> / <m_s, M>`` of the source's band-summed model image
    ``m_s`` and its blend group's ``M``, from the amortized photometry's q-mean fit,
    :func:`probdeblend.photometry.model_blendedness`: 0 isolated, towards 1 buried under
    neighbours; NaN when not computed), ``chi2_b`` (per band: the reduced chi^2 of that fit
    in the source's footprint, its template above 5 % of its peak; ~1 for a galaxy the prior
    models well, large for one it does not, e.g. with star-forming knots; NaN when not
    computed), ``method`` (inference path, e.g. ``"amortized"``, ``"fit:amortized+is"``),
    ``num_samples``,
    ``pareto_k`` (PSIS k-hat; NaN when not computed), ``r_hat`` (max over the source's
    variables; NaN for single-chain methods), ``ess_bulk`` (min), ``n_divergent`` (in the
    source's group; -1 when not applicable).
Flags
    ``flag_edge`` (the source's inference window, ``stamp_size`` px, crosses the image edge),
    ``masked_frac`` (fraction of masked pixels within ``MASK_RADIUS`` px of the source, any
    band), ``flag_failed`` (the requested inference failed; ``fail_reason`` says why, and the
    row holds the fallback result or NaN), ``fail_reason`` (str, empty when fine).

Table metadata (``meta``): ``PBSCHEMA`` (schema version), ``BANDS``, ``BUNIT``, ``PIXORIG``
(0), ``SEED``, ``METHOD``, ``NSAMPLES``, ``PRIOR`` and the deblending settings.

Files: :func:`write_catalog` writes FITS (``.fits``, ``.fits.gz``) or Parquet (``.parquet``)
atomically (a temporary file in the target folder, fsync, rename: an interrupted run never
leaves a file that looks complete); units travel with the columns in both formats.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

__all__ = [
    "SCHEMA_VERSION",
    "QUANTILES",
    "MASK_RADIUS",
    "schema",
    "summarize_draws",
    "summary_columns",
    "make_catalog",
    "write_catalog",
    "read_catalog",
]

#: Catalogue schema version (``PBSCHEMA`` in the table metadata).
SCHEMA_VERSION = "2"
#: Posterior quantiles reported for fluxes and ellipticities (percent).
QUANTILES = (16, 50, 84)
#: Radius (pixels) within which ``masked_frac`` is measured.
MASK_RADIUS = 5.0


def schema(bands: Sequence[str], units: str = "electron", wcs: bool = True) -> list[tuple]:
    """The catalogue columns as ``(name, dtype, unit, description)``, in table order."""
    cols: list[tuple] = [
        ("id", "i8", None, "source id, unique within the image"),
        ("group", "i8", None, "blend group owning the source"),
        ("group_size", "i8", None, "number of sources in the group"),
        ("x", "f8", "pix", "posterior mean x (0-based pixel centre)"),
        ("y", "f8", "pix", "posterior mean y (0-based pixel centre)"),
        ("x_err", "f8", "pix", "half the 16-84 % range of x"),
        ("y_err", "f8", "pix", "half the 16-84 % range of y"),
        ("pos_err", "f8", "pix", "sqrt((x_err^2 + y_err^2) / 2)"),
    ]
    if wcs:
        cols += [("ra", "f8", "deg", "right ascension at (x, y)"),
                 ("dec", "f8", "deg", "declination at (x, y)")]
    cols += [
        ("x_init", "f8", "pix", "detection / input x"),
        ("y_init", "f8", "pix", "detection / input y"),
        ("snr_det", "f8", None, "detection S/N (NaN for input positions)"),
        ("det_pass", "i8", None, "0: detected in the image, 1: in the residual, -1: input"),
    ]
    for b in bands:
        cols.append((f"flux_{b}", "f8", units, f"posterior mean total flux, band {b}"))
        cols.append((f"flux_{b}_err", "f8", units, f"half the 16-84 % range of flux_{b}"))
        for q in QUANTILES:
            cols.append((f"flux_{b}_q{q}", "f8", units, f"{q}% posterior quantile of flux_{b}"))
    for e in ("e1", "e2"):
        cols.append((e, "f8", None, f"posterior mean {e} (reduced shear, PSF-free)"))
        cols.append((f"{e}_err", "f8", None, f"half the 16-84 % range of {e}"))
        for q in QUANTILES:
            cols.append((f"{e}_q{q}", "f8", None, f"{q}% posterior quantile of {e}"))
    cols += [
        ("e_draws_from", "U9", None,
         "'q' (the encoder's joint q), 'posterior' (refined) or 'q_mean' (zero width)"),
        ("method", "U24", None, "inference path"),
        ("num_samples", "i8", None, "posterior draws per source"),
        ("blendedness", "f8", None, "1 - <m,m>/<m,M> of the q-mean model (0: isolated)"),
    ]
    cols += [(f"chi2_{b}", "f8", None, f"footprint reduced chi^2 of the q-mean model, band {b}")
             for b in bands]
    cols += [
        ("pareto_k", "f8", None, "PSIS k-hat (NaN if not computed)"),
        ("r_hat", "f8", None, "max R-hat of the source's variables (NaN single chain)"),
        ("ess_bulk", "f8", None, "min bulk ESS of the source's variables"),
        ("n_divergent", "i8", None, "divergent transitions in the group (-1: n/a)"),
        ("flag_edge", "?", None, "inference window crosses the image edge"),
        ("masked_frac", "f8", None, f"masked pixel fraction within {MASK_RADIUS:g} px"),
        ("flag_failed", "?", None, "requested inference failed (see fail_reason)"),
        ("fail_reason", "U80", None, "why the inference failed ('' if it did not)"),
    ]
    return cols


def summarize_draws(values: np.ndarray, axis: int = 1) -> dict[str, np.ndarray]:
    """Mean, std, :data:`QUANTILES` and width of draws along ``axis`` (NaN-safe: NaN draws
    ignored).

    Returns a dict with keys ``mean``, ``std``, ``q16``, ``q50``, ``q84`` and ``width``
    (``(q84 - q16) / 2``, the catalogue's ``*_err``); sources whose draws
    are all NaN get NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    finite = np.isfinite(v)
    n = finite.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        vz = np.where(finite, v, 0.0)
        mean = vz.sum(axis=axis) / n
        dev = np.where(finite, v - np.expand_dims(mean, axis), 0.0)
        std = np.sqrt((dev**2).sum(axis=axis) / np.maximum(n - 1, 1))
    out["mean"] = np.where(n > 0, mean, np.nan)
    out["std"] = np.where(n > 1, std, np.where(n == 1, 0.0, np.nan))
    if np.all(finite):
        qs = np.percentile(v, QUANTILES, axis=axis)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            qs = np.nanpercentile(v, QUANTILES, axis=axis)
    for q, arr in zip(QUANTILES, qs, strict=True):
        out[f"q{q}"] = arr
    out["width"] = 0.5 * (out["q84"] - out["q16"])
    return out


def summary_columns(draws: Mapping[str, np.ndarray], bands: Sequence[str]) -> dict:
    """Catalogue columns (means, widths, quantiles) from posterior draws ``flux`` ``(n, S, B)``,
    ``e1``, ``e2``, ``x``, ``y`` ``(n, S)``."""
    cols: dict[str, np.ndarray] = {}
    flux = np.asarray(draws["flux"], dtype=np.float64)
    for k, b in enumerate(bands):
        s = summarize_draws(flux[:, :, k])
        cols[f"flux_{b}"], cols[f"flux_{b}_err"] = s["mean"], s["width"]
        for q in QUANTILES:
            cols[f"flux_{b}_q{q}"] = s[f"q{q}"]
    for e in ("e1", "e2"):
        s = summarize_draws(draws[e])
        cols[e], cols[f"{e}_err"] = s["mean"], s["width"]
        for q in QUANTILES:
            cols[f"{e}_q{q}"] = s[f"q{q}"]
    for c in ("x", "y"):
        s = summarize_draws(draws[c])
        cols[c], cols[f"{c}_err"] = s["mean"], s["width"]
    return cols


def make_catalog(bands: Sequence[str], units: str, columns: Mapping[str, Any],
                 draws: Mapping[str, np.ndarray] | None = None, wcs=None,
                 meta: Mapping[str, Any] | None = None) -> Table:
    """Assemble a catalogue Table with the documented schema.

    Parameters
    ----------
    bands : sequence of str
    units : str
        Flux unit of the scene (``scene.units``).
    columns : mapping
        Per-source arrays for any schema column (``id``, ``group``, ``x_init``, flags, ...).
        Missing columns get defaults (NaN, -1, False, "").
    draws : mapping, optional
        Posterior draws ``flux`` ``(n, S, B)``, ``e1``, ``e2``, ``x``, ``y`` ``(n, S)``; their
        summaries fill the flux / ellipticity / position columns (overriding ``columns``).
    wcs : astropy.wcs.WCS, optional
        Adds ``ra``, ``dec`` at the posterior-mean positions.
    meta : mapping, optional
        Extra table metadata.
    """
    cols = dict(columns)
    n = len(next(iter(cols.values()))) if cols else 0
    if draws is not None:
        cols.update(summary_columns(draws, bands))
        n = len(cols["x"])
    if "x_err" in cols and "y_err" in cols and "pos_err" not in cols:
        cols["pos_err"] = np.sqrt((np.asarray(cols["x_err"]) ** 2
                                   + np.asarray(cols["y_err"]) ** 2) / 2)
    if wcs is not None and n:
        x, y = np.asarray(cols["x"], np.float64), np.asarray(cols["y"], np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        ra, dec = np.full(n, np.nan), np.full(n, np.nan)
        if ok.any():
            world = wcs.pixel_to_world_values(x[ok], y[ok])
            ra[ok], dec[ok] = world[0], world[1]
        cols["ra"], cols["dec"] = ra, dec
    elif wcs is not None:
        cols["ra"], cols["dec"] = np.zeros(0), np.zeros(0)
    t = Table()
    for name, dtype, unit, desc in schema(bands, units, wcs is not None):
        if name in cols:
            arr = np.asarray(cols[name])
            arr = arr.astype(dtype) if dtype[0] != "U" else arr.astype(str)
        else:
            arr = _default(dtype, n)
        if len(arr) != n:
            raise ValueError(f"catalog column {name!r} has {len(arr)} rows, expected {n}")
        t[name] = arr
        if unit is not None:
            t[name].unit = unit
        t[name].description = desc
    t.meta["PBSCHEMA"] = SCHEMA_VERSION
    t.meta["BANDS"] = ",".join(bands)
    t.meta["BUNIT"] = units
    t.meta["PIXORIG"] = 0
    for k, v in (meta or {}).items():
        t.meta[k] = v
    return t


def _default(dtype: str, n: int) -> np.ndarray:
    if dtype == "?":
        return np.zeros(n, dtype=bool)
    if dtype.startswith("i"):
        return np.full(n, -1, dtype=np.int64)
    if dtype.startswith("U"):
        return np.full(n, "", dtype=dtype)
    return np.full(n, np.nan)


def _format(path: Path, format: str | None) -> str:  # noqa: A002 - astropy's name
    if format is not None:
        if format not in ("fits", "parquet"):
            from .errors import ArgumentError

            raise ArgumentError("format", format, "must be 'fits' or 'parquet'")
        return format
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".fits", ".fit", ".fits.gz", ".fz")):
        return "fits"
    from .errors import ArgumentError

    raise ArgumentError("path", str(path), "end it in .fits, .fits.gz or .parquet (or pass "
                                           "format='fits' / 'parquet')")


def _atomic(path: Path, overwrite: bool):
    try:
        from .atomic import atomic_path
    except ImportError:  # pragma: no cover - atomic.py ships with the package
        atomic_path = _atomic_path_fallback
    return atomic_path(path, overwrite=overwrite)


def _atomic_path_fallback(path, overwrite=False):  # pragma: no cover
    import contextlib
    import uuid

    @contextlib.contextmanager
    def cm():
        p = Path(path)
        if p.exists() and not overwrite:
            raise FileExistsError(f"{str(p)!r} exists; pass overwrite=True")
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp{''.join(p.suffixes)}")
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()

    return cm()


def write_catalog(table: Table, path: str | os.PathLike, overwrite: bool = False,
                  format: str | None = None) -> Path:  # noqa: A002
    """Write a catalogue atomically as FITS or Parquet (from the extension unless ``format``).

    FITS: one binary-table HDU with ``TUNITn`` units and the metadata as header keywords,
    HDU checksums. Parquet: astropy's writer (units and metadata in the file's schema
    metadata, read back by :func:`read_catalog`). The file appears only once complete.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    fmt = _format(path, format)
    with _atomic(path, overwrite) as tmp:
        if fmt == "fits":
            from astropy.io import fits

            hdu = _fits_hdu(table)
            fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, checksum=True)
        else:
            table.write(tmp, format="parquet")
    return path


def _fits_hdu(table: Table):
    """Binary-table HDU; units that FITS does not define (e.g. ``electron``) are written as
    their generic astropy string in ``TUNITn`` (read back by :func:`read_catalog`)."""
    import warnings

    from astropy import units as u
    from astropy.io import fits

    units = {}
    plain = table.copy(copy_data=False)
    for name in plain.colnames:
        unit = plain[name].unit
        if unit is None:
            continue
        try:
            unit.to_string("fits")
        except (ValueError, u.UnitsError):
            units[name] = unit.to_string("generic")
            plain[name].unit = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hdu = fits.table_to_hdu(plain)
    for i, name in enumerate(plain.colnames, start=1):
        if name in units:
            hdu.header[f"TUNIT{i}"] = units[name]
    hdu.name = "CATALOG"
    return hdu


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a catalogue written by :func:`write_catalog` (FITS or Parquet)."""
    path = Path(path)
    fmt = _format(path, None)
    if fmt == "fits":
        from astropy import units as u

        t = Table.read(path, hdu="CATALOG", unit_parse_strict="silent")
        for name in t.colnames:
            if t[name].dtype.kind in "SU":  # bytes in FITS; empty strings read as masked
                col = t[name]
                col = col.filled(b"" if col.dtype.kind == "S" else "") if hasattr(
                    col, "filled") else col
                t[name] = np.asarray(col).astype(str)
            if isinstance(t[name].unit, u.UnrecognizedUnit):
                t[name].unit = u.Unit(str(t[name].unit), format="generic",
                                      parse_strict="silent")
        return t
    return Table.read(path, format="parquet")
