"""Validate learned galaxy priors on held-out simulated galaxies: reconstruction and realism.

Example (the shipped LSST priors; a few minutes on 2 CPU cores)::

    python benchmarks/validate_priors.py --priors lsst-vae lsst-vaegan --n 2000 \\
        --n-samples 4000 --seed 99 --out benchmarks/results/priors [--update-cards]

Steps (every definition is spelled out in ``docs/prior_validation.md``):

1. **Held-out galaxies.** ``isolated_stamps(n, Frame(survey, bands, stamp_size, pixel_scale,
   psf_fwhm), seed=seed)`` in each prior's model frame (same bands, grid and Gaussian model PSF).
   The training sets are simulated with other seeds (``data/lsst-isolated-model``: dataset seed
   2026, per-shard seeds spawned from it), so these galaxies were never seen in training.
2. **Reconstruction.** ``z = E[q(z | x)]`` (the encoder mean) of each noiseless galaxy, decoded
   and multiplied by the true per-band fluxes. Image metrics (MSE, PSNR, SSIM) on flux-normalised
   images in the r band and over all bands; aperture-flux error (r band, circular aperture of
   radius 2 true half-light radii about the stamp centre); ellipticity error (REGAUSS on the
   band-averaged flux-normalised images, reconstruction vs truth image, plus the estimator's own
   floor: truth image vs catalogue intrinsic ellipticity); size error (half-light radius).
3. **Realism of prior draws.** ``z ~ prior`` (the latent flow) and, for comparison, ``z ~ N(0, I)``
   pushed through the decoder directly; half-light radius, ``|g|`` and the colour-gradient
   statistic ``hlr_g / hlr_i`` compared with the held-out simulator galaxies (two-sample KS).
   Mean log-density of the held-out encoder means under the flow and under ``N(0, I)``.
4. **Figures** (PNG, each < 400 kB): ``reconstructions.png``, ``samples.png``,
   ``histograms.png``.
5. **Outputs:** ``report.md`` and ``metrics.json`` in ``--out``; with ``--update-cards`` the
   metrics are merged into each prior's model card (``validation.heldout``) without touching
   its weights (the card's sha256 covers only the safetensors file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SCRIPT = "benchmarks/validate_priors.py"
#: MSE of flux-normalised images is reported in the markdown tables in units of this number.
MSE_UNIT = 1e-8
#: Figures larger than this are re-saved at a lower resolution.
MAX_FIGURE_BYTES = 400_000
#: Reconstruction statistics that describe one galaxy each (used for medians / means).
_IMAGE_METRICS = ("mse", "psnr", "ssim")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--priors",
        nargs="+",
        default=["lsst-vae", "lsst-vaegan"],
        help="prior names (shipped) or paths to a card / weights / their stem",
    )
    p.add_argument("--n", type=int, default=2000, help="held-out simulator galaxies")
    p.add_argument("--n-samples", type=int, default=4000, help="prior draws per latent density")
    p.add_argument("--seed", type=int, default=99, help="held-out simulation and sampling seed")
    p.add_argument("--out", default="benchmarks/results/priors", help="output folder")
    p.add_argument("--batch-size", type=int, default=256, help="encode / decode batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--update-cards",
        action="store_true",
        help="merge the metrics into each prior's card (validation.heldout); weights untouched",
    )
    args = p.parse_args(argv)
    if args.n < 10:
        p.error(f"--n must be at least 10 (got {args.n}): the statistics need a sample")
    if args.n_samples < 16:
        p.error(f"--n-samples must be at least 16 (got {args.n_samples}): the figure shows 16")
    if args.batch_size < 1:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


# -- robust statistics ----------------------------------------------------------------------------
def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=float).ravel()
    return x[np.isfinite(x)]


def median(x) -> float:
    x = _finite(x)
    return float(np.median(x)) if x.size else float("nan")


def mean(x) -> float:
    x = _finite(x)
    return float(np.mean(x)) if x.size else float("nan")


def nmad(x) -> float:
    """Normalised median absolute deviation, ``1.4826 median(|x - median(x)|)``."""
    x = _finite(x)
    if not x.size:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def rms(x) -> float:
    x = _finite(x)
    return float(np.sqrt(np.mean(x**2))) if x.size else float("nan")


def nan_fraction(x) -> float:
    x = np.asarray(x, dtype=float).ravel()
    return float(np.mean(~np.isfinite(x))) if x.size else float("nan")


def ks(sample, reference) -> dict:
    """Two-sample KS test of ``sample`` against ``reference`` (finite values only)."""
    from scipy.stats import ks_2samp

    a, b = _finite(sample), _finite(reference)
    if a.size < 2 or b.size < 2:
        return {"ks_stat": float("nan"), "ks_pvalue": float("nan")}
    res = ks_2samp(a, b)
    return {"ks_stat": float(res.statistic), "ks_pvalue": float(res.pvalue)}


# -- measurements ---------------------------------------------------------------------------------
def aperture_flux(images, radius, center) -> np.ndarray:
    """Flux inside circles of ``radius`` pixels about ``center = (x, y)``.

    Anti-aliased aperture, as in :func:`probdeblend.measure.half_light_radius`: a pixel whose
    centre lies at distance ``r`` counts with weight ``clip(radius - r + 1/2, 0, 1)``.
    ``images (N, y, x)``, ``radius (N,)``; returns ``(N,)``.
    """
    img = np.asarray(images, dtype=np.float64)
    ny, nx = img.shape[-2:]
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    r = np.hypot(x - center[0], y - center[1])
    w = np.clip(np.asarray(radius, dtype=np.float64)[:, None, None] - r + 0.5, 0.0, 1.0)
    return (img * w).sum(axis=(-2, -1))


def normalise(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band unit-sum images (float64) and the band sums ``(N, band)``."""
    img = np.asarray(images, dtype=np.float64)
    sums = img.sum(axis=(-2, -1))
    if not np.all(sums > 0):
        bad = np.argwhere(~(sums > 0))[:5].tolist()
        raise ValueError(f"held-out galaxies with non-positive band flux at (galaxy, band) {bad}")
    return img / sums[..., None, None], sums


def galaxy_stats(norm: np.ndarray, psf: np.ndarray, colour_bands: tuple[int, int]) -> dict:
    """Size, shape and colour-gradient statistics of flux-normalised images ``(N, band, y, x)``.

    ``hlr``: half-light radius (pixels) of the band-mean image; ``g1, g2``: REGAUSS reduced shear
    of the PSF-free galaxy behind the band-mean image (NaN where HSM fails); ``abs_g``;
    ``colour_gradient``: hlr in band ``colour_bands[0]`` / hlr in band ``colour_bands[1]``.
    """
    from probdeblend import measure

    band_mean = norm.mean(axis=1)
    hlr = measure.half_light_radius(band_mean)
    g1, g2 = measure.psf_corrected_shape(band_mean, psf)
    hb = measure.half_light_radius(norm[:, list(colour_bands)])
    return {
        "hlr": hlr,
        "g1": g1,
        "g2": g2,
        "abs_g": np.hypot(g1, g2),
        "colour_gradient": hb[:, 0] / hb[:, 1],
    }


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- held-out data --------------------------------------------------------------------------------
def _frame_key(frame) -> tuple:
    return (frame.bands, frame.pixel_scale, frame.stamp_size, frame.psf_fwhm, frame.survey.lower())


def simulate_heldout(frame, n: int, seed: int, batch: int) -> dict:
    """Noiseless held-out galaxies in a prior's model frame and their statistics."""
    from probdeblend.simulate import Frame, isolated_stamps

    sim_frame = Frame.of_model_frame(frame)
    t0 = time.perf_counter()
    res = isolated_stamps(n, sim_frame, seed=seed)
    t_sim = time.perf_counter() - t0
    truth = res["truth"]
    images = res["noiseless"]
    bands = list(frame.bands)
    psf = frame.psf_image(25)
    cb = _colour_bands(bands)
    parts = []
    for sl in _slices(n, batch):
        norm, _ = normalise(images[sl])
        parts.append(galaxy_stats(norm, psf, cb))
    stats = _concat(parts)
    g_int = np.asarray(truth["g1_int"]) + 1j * np.asarray(truth["g2_int"])
    dg = (stats["g1"] + 1j * stats["g2"]) - g_int
    floor = {
        "median_abs_dg": median(np.abs(dg)),
        "rms_dg1": rms(dg.real),
        "rms_dg2": rms(dg.imag),
        "mean_dg1": mean(dg.real),
        "mean_dg2": mean(dg.imag),
        "hsm_failure_fraction": nan_fraction(stats["g1"]),
    }
    return {
        "frame": frame,
        "sim_frame": sim_frame,
        "images": images,
        "truth": truth,
        "psf": psf,
        "stats": stats,
        "estimator_floor": floor,
        "wall_s": time.perf_counter() - t0,
        "simulate_s": t_sim,
    }


def _slices(n: int, batch: int):
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _colour_bands(bands) -> tuple[int, int]:
    bands = list(bands)
    if "g" in bands and "i" in bands:
        return bands.index("g"), bands.index("i")
    return 0, len(bands) - 1


def _ref_band(bands) -> int:
    bands = list(bands)
    return bands.index("r") if "r" in bands else len(bands) // 2


# -- reconstruction -------------------------------------------------------------------------------
def reconstruction(prior, held: dict, batch: int, keep=()) -> tuple:
    """Reconstruction metrics of one prior on the held-out galaxies.

    Returns ``(metrics, per_galaxy, kept, locs)``: the summary dictionary, per-galaxy arrays,
    the flux-normalised reconstructions of the galaxies ``keep`` (for the figure) and the
    encoder means ``(n, D)``.
    """
    import torch

    from probdeblend import measure

    frame = held["frame"]
    bands = list(frame.bands)
    ir = _ref_band(bands)
    cb = _colour_bands(bands)
    images, truth, psf = held["images"], held["truth"], held["psf"]
    n = len(images)
    centre = frame.center
    radius = 2.0 * np.asarray(truth["hlr"], dtype=float) / frame.pixel_scale
    keep = list(keep)
    kept = np.zeros((len(keep),) + frame.shape)
    per = {"mse": [], "psnr": [], "ssim": [], "mse_all": [], "psnr_all": [], "ap_rel": []}
    rec_stats, locs = [], []
    for sl in _slices(n, batch):
        tn, _ = normalise(images[sl])
        with torch.no_grad():
            loc, _ = prior.encode(torch.as_tensor(images[sl]))
            rn = prior.decode(loc).double().numpy()
        locs.append(loc)
        peak = tn[:, ir].max(axis=(-2, -1))  # data range L: max of the true r image
        mse_b = measure.mse(rn, tn)  # (B, band)
        mse_all = mse_b.mean(axis=1)
        per["mse"].append(mse_b)
        per["psnr"].append(10.0 * np.log10(peak[:, None] ** 2 / mse_b))
        per["ssim"].append(measure.ssim(rn, tn, data_range=peak[:, None]))
        per["mse_all"].append(mse_all)
        per["psnr_all"].append(10.0 * np.log10(peak**2 / mse_all))
        ap_t = aperture_flux(tn[:, ir], radius[sl], centre)
        ap_r = aperture_flux(rn[:, ir], radius[sl], centre)
        per["ap_rel"].append(ap_r / ap_t - 1.0)
        rec_stats.append(galaxy_stats(rn, psf, cb))
        for j, k in enumerate(keep):
            if sl.start <= k < sl.stop:
                kept[j] = rn[k - sl.start]
    per = {k: np.concatenate(v) for k, v in per.items()}
    rec = _concat(rec_stats)
    tru = held["stats"]
    dg = (rec["g1"] + 1j * rec["g2"]) - (tru["g1"] + 1j * tru["g2"])
    size_rel = rec["hlr"] / tru["hlr"] - 1.0
    per.update(dg=dg, size_rel=size_rel)

    def image_summary(mse, psnr, ssim) -> dict:
        return {
            "mse_median": median(mse),
            "mse_mean": mean(mse),
            "psnr_median": median(psnr),
            "psnr_mean": mean(psnr),
            "ssim_median": median(ssim),
            "ssim_mean": mean(ssim),
        }

    metrics = {
        "r_band": image_summary(per["mse"][:, ir], per["psnr"][:, ir], per["ssim"][:, ir]),
        "all_bands": image_summary(per["mse_all"], per["psnr_all"], per["ssim"].mean(axis=1)),
        "per_band": {
            b: {
                "mse_median": median(per["mse"][:, i]),
                "psnr_median": median(per["psnr"][:, i]),
                "ssim_median": median(per["ssim"][:, i]),
            }
            for i, b in enumerate(bands)
        },
        "aperture_flux_r": {
            "median_rel_err": median(per["ap_rel"]),
            "nmad_rel_err": nmad(per["ap_rel"]),
        },
        "ellipticity": {
            "median_abs_dg": median(np.abs(dg)),
            "rms_dg1": rms(dg.real),
            "rms_dg2": rms(dg.imag),
            "mean_dg1": mean(dg.real),
            "mean_dg2": mean(dg.imag),
            "hsm_failure_fraction": nan_fraction(rec["g1"]),
        },
        "size": {
            "median_rel_err": median(size_rel),
            "nmad_rel_err": nmad(size_rel),
        },
    }
    return metrics, per, kept, torch.cat(locs)


def latent_log_prob(prior, locs) -> dict:
    """Log-density (nats) of the held-out encoder means under the prior and under N(0, I)."""
    import torch

    with torch.no_grad():
        normal = -0.5 * (locs.double() ** 2).sum(-1) - 0.5 * locs.shape[-1] * math.log(2 * math.pi)
        out = {
            "normal_mean_nats": mean(normal.numpy()),
            "normal_median_nats": median(normal.numpy()),
        }
        if prior.flow is not None:
            lp = prior.log_prob(locs).double().numpy()
            out.update(flow_mean_nats=mean(lp), flow_median_nats=median(lp))
    return out


# -- realism of prior draws -----------------------------------------------------------------------
def draw_and_measure(prior, z, held: dict, batch: int, n_keep: int = 16) -> tuple[dict, np.ndarray]:
    """Decode latents ``z`` in batches, measure them; keep the first ``n_keep`` images."""
    import torch

    frame = held["frame"]
    cb = _colour_bands(frame.bands)
    parts, kept = [], []
    for sl in _slices(len(z), batch):
        with torch.no_grad():
            img = prior.decode(z[sl]).double().numpy()
        parts.append(galaxy_stats(img, held["psf"], cb))
        if sum(len(k) for k in kept) < n_keep:
            kept.append(img[: n_keep - sum(len(k) for k in kept)])
    return _concat(parts), np.concatenate(kept)


def realism(stats: dict, sim_stats: dict) -> dict:
    out = {}
    for key in ("hlr", "abs_g", "colour_gradient"):
        out[key] = {
            **ks(stats[key], sim_stats[key]),
            "median": median(stats[key]),
            "simulator_median": median(sim_stats[key]),
        }
    out["hsm_failure_fraction"] = nan_fraction(stats["g1"])
    return out


# -- figures --------------------------------------------------------------------------------------
def _ab_scale(frame) -> np.ndarray:
    """Per-band factors turning electrons into AB-like flux densities (a 25 mag source -> 1)."""
    from probdeblend.survey import get_survey

    try:
        survey = get_survey(frame.survey.lower())
        return np.array([1.0 / float(survey.band(b).mag_to_flux(25.0)) for b in frame.bands])
    except Exception:  # unknown survey / band: plain electrons
        return np.ones(frame.n_bands)


def _rgb(img, frame, stretch=None):
    from probdeblend.plotting import rgb_composite

    return rgb_composite(img, frame.bands, rgb=("i", "r", "g"), stretch=stretch)


def _stretch(img, frame, q: float = 8.0) -> float:
    """The stretch :func:`rgb_composite` would choose for ``img`` (to reuse it on other images)."""
    bands = list(frame.bands)
    idx = [bands.index(b) if b in bands else [len(bands) - 1, len(bands) // 2, 0][k]
           for k, b in enumerate(("i", "r", "g"))]  # fmt: skip
    total = np.mean([img[i] for i in idx], axis=0)
    return max(float(np.percentile(total, 99.5)) / q, 1e-12)


def _savefig(fig, path: Path, dpi: int = 100) -> None:
    import matplotlib.pyplot as plt

    for d in (dpi, int(dpi * 0.75), int(dpi * 0.55), int(dpi * 0.4)):
        fig.savefig(path, dpi=d)
        if path.stat().st_size <= MAX_FIGURE_BYTES:
            break
    plt.close(fig)


def _mosaic(images: np.ndarray, ncol: int = 4, gap: int = 2) -> np.ndarray:
    """(k, y, x, 3) RGB images -> one (rows, cols, 3) mosaic with white gaps."""
    k, h, w, c = images.shape
    nrow = math.ceil(k / ncol)
    out = np.ones((nrow * h + (nrow - 1) * gap, ncol * w + (ncol - 1) * gap, c))
    for i in range(k):
        r, cc = divmod(i, ncol)
        out[r * (h + gap) : r * (h + gap) + h, cc * (w + gap) : cc * (w + gap) + w] = images[i]
    return out


def figure_reconstructions(path: Path, held: dict, idx, recons: dict) -> None:
    """Rows: truth, then per prior its reconstruction and its r-band residual."""
    import matplotlib.pyplot as plt

    frame = held["frame"]
    ab = _ab_scale(frame)[:, None, None]
    ir = _ref_band(frame.bands)
    nrow, ncol = 1 + 2 * len(recons), len(idx)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.7 * ncol + 0.9, 1.75 * nrow), squeeze=False)
    truth_tab = held["truth"]
    for j, k in enumerate(idx):
        t_img = held["images"][k].astype(np.float64)
        t_ab = t_img * ab
        s = _stretch(t_ab, frame)
        axes[0, j].imshow(_rgb(t_ab, frame, s), origin="lower")
        axes[0, j].set_title(
            f'r={truth_tab["mag"][k]:.1f}, hlr={truth_tab["hlr"][k]:.2f}"', fontsize=8
        )
        sums = t_img.sum(axis=(-2, -1))[:, None, None]
        for p, (name, rec) in enumerate(recons.items()):
            r_img = rec[j] * sums
            axes[1 + 2 * p, j].imshow(_rgb(r_img * ab, frame, s), origin="lower")
            peak = t_img[ir].max()
            res = (r_img[ir] - t_img[ir]) / peak
            im = axes[2 + 2 * p, j].imshow(res, origin="lower", cmap="RdBu_r", vmin=-0.1, vmax=0.1)
            axes[2 + 2 * p, j].text(
                1, 1, f"max {np.abs(res).max():.0%}", fontsize=7, color="k", va="bottom"
            )
            if j == 0:
                axes[1 + 2 * p, 0].set_ylabel(name, fontsize=8)
                axes[2 + 2 * p, 0].set_ylabel(f"{name}\nresidual", fontsize=8)
    axes[0, 0].set_ylabel("truth", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "held-out galaxies (i,r,g composite, one stretch per galaxy); residual: "
        f"({frame.bands[ir]} recon - truth) / truth peak",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    cax = fig.add_axes((0.94, 0.1, 0.015, 0.3))
    fig.colorbar(im, cax=cax, label="residual / truth peak")
    _savefig(fig, path)


def figure_samples(path: Path, held: dict, panels: dict) -> None:
    """4x4 simulator galaxies next to 4x4 decoded draws of each prior / latent density.

    Draws are flux-normalised; they are shown with the per-band fluxes of the 16 simulator
    galaxies of the first panel (draw k gets the fluxes of galaxy k), since the prior models
    morphology only.
    """
    import matplotlib.pyplot as plt

    frame = held["frame"]
    ab = _ab_scale(frame)[:, None, None]
    sim = held["images"][:16].astype(np.float64)
    sums = sim.sum(axis=(-2, -1))[:, :, None, None]
    blocks = {"simulator": np.stack([_rgb(im * ab, frame) for im in sim])}
    for name, imgs in panels.items():
        blocks[name] = np.stack(
            [_rgb(im * s * ab, frame) for im, s in zip(imgs[:16], sums, strict=False)]
        )
    fig, axes = plt.subplots(1, len(blocks), figsize=(2.5 * len(blocks), 2.9), squeeze=False)
    for ax, (name, b) in zip(axes[0], blocks.items(), strict=True):
        ax.imshow(_mosaic(b), origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _savefig(fig, path)


def figure_histograms(path: Path, sim_stats: dict, sample_stats: dict, colour_label: str) -> None:
    """Histograms of hlr, |g| and the colour gradient: simulator vs prior draws.

    ``sample_stats[prior][latent]`` are :func:`galaxy_stats` dictionaries; one colour per prior,
    solid for flow draws and dashed for ``N(0, I)`` draws. Values outside the plotted range are
    piled into the end bins.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = (
        ("hlr", "half-light radius [pixels] (band mean)"),
        ("abs_g", "|g| (REGAUSS, band mean)"),
        ("colour_gradient", colour_label),
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ref = _finite(sim_stats[key])
        allv = np.concatenate(
            [ref] + [_finite(s[key]) for d in sample_stats.values() for s in d.values()]
        )
        if key == "abs_g":
            bins = np.linspace(0.0, 1.0, 41)
        elif key == "hlr":  # log bins: the N(0, I) draws can be much larger than galaxies
            lo, hi = np.percentile(allv[allv > 0], [0.5, 99.5]) if allv.size else (1.0, 10.0)
            bins = np.geomspace(lo, max(hi, 1.01 * lo), 41)
            ax.set_xscale("log")
            ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:
            lo, hi = np.percentile(allv, [0.5, 99.5]) if allv.size else (0.0, 1.0)
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        lo, hi = bins[0], bins[-1]
        ax.hist(np.clip(ref, lo, hi), bins=bins, density=True, color="0.75", label="simulator")
        for k, (name, d) in enumerate(sample_stats.items()):
            for latent, s in d.items():
                ax.hist(
                    np.clip(_finite(s[key]), lo, hi),
                    bins=bins,
                    density=True,
                    histtype="step",
                    lw=1.4,
                    ls="-" if latent == "flow" else "--",
                    color=colours[k % len(colours)],
                    label=f"{name}, z ~ {latent}",
                )
        ax.set_xlabel(label)
    axes[0].set_ylabel("density")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)


# -- cards ----------------------------------------------------------------------------------------
def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def update_card(name_or_path, validation: dict) -> Path:
    """Merge ``validation`` into a prior's card ``validation`` dict; the weights are untouched.

    The card is rewritten atomically (temporary file + rename). Refuses to write when the
    weights do not match the card's sha256 (it would bless a corrupted file), and re-loads the
    prior afterwards to prove the card is still valid.
    """
    from probdeblend.errors import ChecksumMismatchError
    from probdeblend.priors import io

    card_path, weights_path = io._resolve(name_or_path)
    card = io.read_card(card_path)
    digest = io.file_sha256(weights_path)
    if digest != card["sha256"]:
        raise ChecksumMismatchError(
            f"not updating {card_path}: its weights {weights_path} have sha256 {digest}, the card "
            f"records {card['sha256']}"
        )
    card["validation"] = _deep_merge(card.get("validation") or {}, validation)
    text = json.dumps(io._jsonable(card), indent=2) + "\n"
    tmp = Path(str(card_path) + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, card_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    io.load_prior(card_path)  # raises if the card no longer fits its weights
    return card_path


# -- report ---------------------------------------------------------------------------------------
def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _f(x, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def write_report(path: Path, result: dict) -> None:
    cfg, priors = result["config"], result["priors"]
    names = list(priors)
    first_frame = next(iter(result["simulator"].values()))
    rb, (cb0, cb1) = first_frame["ref_band"], first_frame["colour_bands"]
    lines = [
        "# Validation of the learned priors on held-out galaxies",
        "",
        f"Generated by `{SCRIPT}` on {result['date']}. Method and definitions: "
        "[docs/prior_validation.md](../../../docs/prior_validation.md).",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"* held-out galaxies: {cfg['n']} (`isolated_stamps`, seed {cfg['seed']}; training data "
        "seed 2026), noiseless, in each prior's model frame",
        f"* prior draws: {cfg['n_samples']} per latent density (flow and N(0, I))",
        f"* wall time: {result['wall_time_s']:.1f} s; machine: {result['machine']['cpu']}, "
        f"{result['machine']['cpu_count']} cores, torch {result['machine']['torch']} "
        f"({result['machine']['torch_threads']} threads), {result['machine']['platform']}",
        "",
        "## Priors",
        "",
    ]
    lines += _table(
        ["prior", "kind", "latent dim", "latent prior", "source", "sha256"],
        [
            [
                n,
                p["card"]["kind"],
                str(p["card"]["latent_dim"]),
                p["card"]["latent_prior"],
                f"`{p['card']['path']}`",
                f"`{p['card']['sha256'][:12]}`",
            ]
            for n, p in priors.items()
        ],
    )
    rec = {n: p["reconstruction"] for n, p in priors.items()}
    u = f"1e{int(round(math.log10(MSE_UNIT)))}"
    lines += [
        "",
        "## Reconstruction (encoder mean -> decoder)",
        "",
        f"Images flux-normalised per band (each band sums to 1). MSE in units of {u} "
        f"(per-pixel, squared fraction of the band flux); PSNR in dB with data range = peak of "
        f"the true {rb} image; SSIM (Wang et al. 2004, Gaussian window sigma = 1.5 pixels) with "
        f"the same data range. Median (mean) over galaxies.",
        "",
    ]
    rows = []
    for sec, label in (("r_band", f"{rb} band"), ("all_bands", "all bands")):
        for m, name, scale, fmt in (
            ("mse", f"MSE [{u}]", 1.0 / MSE_UNIT, ".3g"),
            ("psnr", "PSNR [dB]", 1.0, ".2f"),
            ("ssim", "SSIM", 1.0, ".5f"),
        ):
            rows.append(
                [f"{name}, {label}"]
                + [
                    f"{_f(rec[n][sec][m + '_median'] * scale, fmt)} "
                    f"({_f(rec[n][sec][m + '_mean'] * scale, fmt)})"
                    for n in names
                ]
            )
    rows += [
        [f"aperture flux rel. error ({rb}, r < 2 hlr): median"]
        + [_f(rec[n]["aperture_flux_r"]["median_rel_err"], "+.4f") for n in names],
        ["aperture flux rel. error: NMAD"]
        + [_f(rec[n]["aperture_flux_r"]["nmad_rel_err"], ".4f") for n in names],
        ["ellipticity: median abs(dg)"]
        + [_f(rec[n]["ellipticity"]["median_abs_dg"], ".4f") for n in names],
        ["ellipticity: RMS dg1 / RMS dg2"]
        + [
            f"{_f(rec[n]['ellipticity']['rms_dg1'], '.4f')} / "
            f"{_f(rec[n]['ellipticity']['rms_dg2'], '.4f')}"
            for n in names
        ],
        ["ellipticity: mean dg1 / mean dg2"]
        + [
            f"{_f(rec[n]['ellipticity']['mean_dg1'], '+.4f')} / "
            f"{_f(rec[n]['ellipticity']['mean_dg2'], '+.4f')}"
            for n in names
        ],
        ["REGAUSS failures (reconstructions)"]
        + [_f(rec[n]["ellipticity"]["hsm_failure_fraction"], ".2%") for n in names],
        ["half-light radius rel. error: median"]
        + [_f(rec[n]["size"]["median_rel_err"], "+.4f") for n in names],
        ["half-light radius rel. error: NMAD"]
        + [_f(rec[n]["size"]["nmad_rel_err"], ".4f") for n in names],
    ]
    lines += _table(["metric"] + names, rows)
    lines += ["", "Per band (median MSE / PSNR / SSIM):", ""]
    bands = list(next(iter(rec.values()))["per_band"])
    lines += _table(
        ["band"] + names,
        [
            [b]
            + [
                f"{_f(rec[n]['per_band'][b]['mse_median'] / MSE_UNIT)} / "
                f"{_f(rec[n]['per_band'][b]['psnr_median'], '.2f')} / "
                f"{_f(rec[n]['per_band'][b]['ssim_median'], '.5f')}"
                if b in rec[n]["per_band"]
                else "n/a"
                for n in names
            ]
            for b in bands
        ],
    )
    lines += [
        "",
        "Estimator floor: REGAUSS on the true (model-PSF convolved) image vs the catalogue "
        "intrinsic ellipticity (g1_int, g2_int):",
        "",
    ]
    lines += _table(
        ["frame", "median abs(dg)", "RMS dg1", "RMS dg2", "mean dg1", "mean dg2", "failures"],
        [
            [
                key,
                _f(s["estimator_floor"]["median_abs_dg"], ".4f"),
                _f(s["estimator_floor"]["rms_dg1"], ".4f"),
                _f(s["estimator_floor"]["rms_dg2"], ".4f"),
                _f(s["estimator_floor"]["mean_dg1"], "+.4f"),
                _f(s["estimator_floor"]["mean_dg2"], "+.4f"),
                _f(s["estimator_floor"]["hsm_failure_fraction"], ".2%"),
            ]
            for key, s in result["simulator"].items()
        ],
    )
    lines += [
        "",
        "## Latent density of held-out galaxies",
        "",
        "Mean (median) log-density, in nats, of the encoder means of the held-out galaxies "
        "under the prior's latent flow and under N(0, I). Higher is better; the difference is "
        "what the flow gains on galaxies it was not fitted to.",
        "",
    ]
    lines += _table(
        ["prior", "flow", "N(0, I)"],
        [
            [
                n,
                f"{_f(p['latent_log_prob']['flow_mean_nats'], '.2f')} "
                f"({_f(p['latent_log_prob']['flow_median_nats'], '.2f')})"
                if "flow_mean_nats" in p["latent_log_prob"]
                else "(no flow)",
                f"{_f(p['latent_log_prob']['normal_mean_nats'], '.2f')} "
                f"({_f(p['latent_log_prob']['normal_median_nats'], '.2f')})",
            ]
            for n, p in priors.items()
        ],
    )
    lines += [
        "",
        "## Realism of prior draws",
        "",
        f"Two-sample KS statistic D (p-value) of each statistic of {cfg['n_samples']} decoded "
        f"draws against the {cfg['n']} held-out simulator galaxies; medians alongside. "
        f"hlr: half-light radius [pixels] of the band-mean image; abs(g): REGAUSS on the "
        f"band-mean image; colour gradient: hlr({cb0}) / hlr({cb1}). Smaller D is better.",
        "",
    ]
    rows = []
    for n, p in priors.items():
        for latent, r in p["realism"].items():
            rows.append(
                [n, latent]
                + [
                    f"{_f(r[k]['ks_stat'], '.3f')} ({_f(r[k]['ks_pvalue'], '.2g')})"
                    for k in ("hlr", "abs_g", "colour_gradient")
                ]
                + [
                    f"{_f(r[k]['median'], '.3f')} vs {_f(r[k]['simulator_median'], '.3f')}"
                    for k in ("hlr", "abs_g", "colour_gradient")
                ]
                + [_f(r["hsm_failure_fraction"], ".1%")]
            )
    lines += _table(
        [
            "prior",
            "z from",
            "D hlr",
            "D abs(g)",
            "D colour grad.",
            "median hlr (sim)",
            "median abs(g) (sim)",
            "median colour grad. (sim)",
            "REGAUSS failures",
        ],
        rows,
    )
    lines += ["", "## Figures", ""]
    for f, caption in (
        (
            "reconstructions.png",
            "Held-out galaxies, their reconstructions and r-band residuals",
        ),
        (
            "samples.png",
            "Simulator galaxies vs decoded prior draws (draws shown with the simulator "
            "galaxies' band fluxes)",
        ),
        ("histograms.png", "Size, ellipticity and colour-gradient distributions"),
    ):
        lines += [f"![{caption}]({f})", "", f"*{caption}.*", ""]
    lines += [
        "## Timing",
        "",
        *[f"* {k}: {v:.1f} s" for k, v in result["timing_s"].items()],
        "",
    ]
    path.write_text("\n".join(lines))


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- main -----------------------------------------------------------------------------------------
def _label(name: str, used: set) -> str:
    label, k = name, 2
    while label in used:
        label, k = f"{name}#{k}", k + 1
    used.add(label)
    return label


def _figure_indices(truth, n_show: int = 6) -> list[int]:
    """Galaxies at spread-out quantiles of the true half-light radius."""
    hlr = np.asarray(truth["hlr"], dtype=float)
    order = np.argsort(hlr, kind="stable")
    q = np.linspace(0.1, 0.97, min(n_show, len(hlr)))
    return sorted({int(order[int(round(x * (len(hlr) - 1)))]) for x in q})


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from probdeblend.priors import io

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python " + SCRIPT + (" " + shlex.join(words) if words else "")
    timing: dict[str, float] = {}

    priors, used = {}, set()
    for spec in args.priors:
        prior = io.load_prior(spec)
        card_path, _ = io._resolve(spec)
        priors[_label(prior.name, used)] = (spec, card_path, prior)

    held_by_frame: dict[tuple, dict] = {}
    result: dict = {
        "config": {
            "priors": list(args.priors),
            "n": args.n,
            "n_samples": args.n_samples,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "threads": args.threads,
        },
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "units": {
            "mse": "flux-normalised images (each band sums to 1): squared fraction of band flux "
            "per pixel",
            "psnr": "dB, data range = peak of the true r (reference-band) image",
            "hlr": "pixels",
            "latent_log_prob": "nats",
        },
        "simulator": {},
        "priors": {},
    }
    recons, panels, hist_stats = {}, {}, {}
    first_key = None
    for label, (_, card_path, prior) in priors.items():
        key = _frame_key(prior.full_frame)
        if key not in held_by_frame:
            print(f"simulating {args.n} held-out galaxies for frame {key}", file=sys.stderr)
            held = simulate_heldout(prior.full_frame, args.n, args.seed, args.batch_size)
            held_by_frame[key] = held
            skey = "".join(key[0]) + f', {key[1]}"/px, {key[2]} px, psf {key[3]}"'
            held["label"] = skey
            timing[f"simulate + measure held-out galaxies ({skey})"] = held["wall_s"]
            cb = _colour_bands(key[0])
            result["simulator"][skey] = {
                "estimator_floor": held["estimator_floor"],
                "ref_band": key[0][_ref_band(key[0])],
                "colour_bands": [key[0][cb[0]], key[0][cb[1]]],
                "median_hlr": median(held["stats"]["hlr"]),
                "median_abs_g": median(held["stats"]["abs_g"]),
                "median_colour_gradient": median(held["stats"]["colour_gradient"]),
            }
            if first_key is None:
                first_key = key
                fig_idx = _figure_indices(held["truth"])
        held = held_by_frame[key]
        t0 = time.perf_counter()
        print(f"[{label}] reconstruction", file=sys.stderr)
        rec, _, kept, locs = reconstruction(prior, held, args.batch_size, keep=fig_idx)
        timing[f"{label}: reconstruction"] = time.perf_counter() - t0
        lp = latent_log_prob(prior, locs)

        t0 = time.perf_counter()
        print(f"[{label}] {args.n_samples} prior draws", file=sys.stderr)
        gen = torch.Generator().manual_seed(args.seed)
        u = torch.randn((args.n_samples, prior.latent_dim), generator=gen)
        real = {}
        latents = {"N(0,I)": u}
        if prior.flow is not None:
            with torch.no_grad():
                latents = {"flow": prior.flow(u)[0], "N(0,I)": u}
        for lat, z in latents.items():
            stats, imgs = draw_and_measure(prior, z, held, args.batch_size)
            real[lat] = realism(stats, held["stats"])
            if key == first_key:
                panels[f"{label} {lat}"] = imgs
                hist_stats.setdefault(label, {})[lat] = stats
        timing[f"{label}: prior draws"] = time.perf_counter() - t0
        if key == first_key:
            recons[label] = kept

        card = prior.card
        result["priors"][label] = {
            "card": {
                "name": prior.name,
                "path": str(card_path),
                "kind": prior.kind,
                "latent_dim": prior.latent_dim,
                "latent_prior": prior.latent_prior,
                "sha256": card.get("sha256", ""),
                "frame": held["label"],
            },
            "reconstruction": rec,
            "latent_log_prob": lp,
            "realism": real,
        }

    t0 = time.perf_counter()
    held = held_by_frame[first_key]
    cb = _colour_bands(held["frame"].bands)
    colour_label = f"hlr({held['frame'].bands[cb[0]]}) / hlr({held['frame'].bands[cb[1]]})"
    figure_reconstructions(out / "reconstructions.png", held, fig_idx, recons)
    figure_samples(out / "samples.png", held, panels)
    figure_histograms(out / "histograms.png", held["stats"], hist_stats, colour_label)
    timing["figures"] = time.perf_counter() - t0
    result["timing_s"] = timing
    result["wall_time_s"] = time.perf_counter() - t_start
    result["figures"] = ["reconstructions.png", "samples.png", "histograms.png"]

    (out / "metrics.json").write_text(json.dumps(_json_ready(result), indent=2) + "\n")
    write_report(out / "report.md", result)
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'}", file=sys.stderr)

    if args.update_cards:
        for label, (spec, _, _) in priors.items():
            p = result["priors"][label]
            heldout = {
                "script": SCRIPT,
                "command": command,
                "date": result["date"],
                "seed": args.seed,
                "n": args.n,
                "n_samples": args.n_samples,
                "units": result["units"],
                "estimator_floor": result["simulator"][p["card"]["frame"]]["estimator_floor"],
                "reconstruction": p["reconstruction"],
                "latent_log_prob": p["latent_log_prob"],
                "realism": p["realism"],
            }
            path = update_card(spec, {"heldout": _json_ready(heldout)})
            print(f"updated {path} (validation.heldout)", file=sys.stderr)
    print(f"done in {result['wall_time_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
