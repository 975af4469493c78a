"""Deblending benchmark: accuracy, calibration and speed of probdeblend's posteriors.

    python benchmarks/deblend_benchmark.py --family a --n 500 --methods amortized,sep
    python benchmarks/deblend_benchmark.py --family b --n 500 --methods amortized,sep
    python benchmarks/deblend_benchmark.py --family a --n 40 --methods laplace,auto
    python benchmarks/deblend_benchmark.py --family b --n 40 --methods laplace,auto
    python benchmarks/deblend_benchmark.py --family a --n 500 --methods catalog   # deblend()
    python benchmarks/deblend_benchmark.py --report-only

Only the public API is used (``ScenePosterior``, ``fit``'s ladder check ``q_residual_chi2``,
``probdeblend.measure``). Rows are appended to ``<out>/rows.jsonl`` per (family, method, scene)
and a run skips what is there, so it resumes after an interruption.

Families (80x80 px LSST ugrizy at 0.2"/px, a target near the centre plus 1-3 neighbours within
0.5-3", r = 20-25.3, per-band PSF FWHM x U(0.9, 1.2), variance = sky + source, true positions):

* ``a``: the project's own simulator (:func:`probdeblend.simulate.blend_scene`, the population
  the priors were trained on), seeds 10_000_000 + i;
* ``b``: shifted populations that the prior and the encoder never saw, from the independent
  generator ``benchmarks/shifted_scenes.py``: other colours, single Sersic profiles, a wider
  size range, star-forming knots, a Moffat PSF (scene i uses kind ``KINDS[i % 5]``),
  seeds 20_000_000 + i.

Methods on the target (source 0), each with 200 posterior draws of flux, e1, e2:
``amortized`` (q's own draws: flux and e straight from q, no decode), ``laplace`` (MAP +
Laplace + PSIS, e measured on decoded draws with ``measure.shape_torch``), ``auto`` (the
ladder of ``fit``: q, then laplace where q's residual check fails; NUTS is *not* run here, the
rows record how often the ladder would call it), ``nuts`` (the reference: NumPyro NUTS from
the MAP with the Laplace mass matrix, ``--nuts-chains`` x (``--nuts-warmup`` + the draws);
run it on a subset, e.g. ``--n 30``), ``sep`` (classical Kron fluxes and moments).

Metrics: r-flux relative error of the posterior median (median, NMAD) overall and SNR > 20;
e1 / e2 error of the posterior median against the **true intrinsic g** (NMAD) and the
multiplicative bias m of ``e = (1 + m) g + c``; 68 / 95 % coverage of flux, e1, e2; time per
scene (the whole path: context, draws, measurement); MSE / PSNR / SSIM of the deblended target
(posterior mean image) against its isolated noiseless truth.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _resumable import command_lines, load_rows, log_run
from _resumable import main as resumable_main

import probdeblend as pb
from probdeblend.detection import match_positions, sep_baseline
from probdeblend.fit import q_residual_chi2
from probdeblend.measure import psnr, ssim
from probdeblend.scene_posterior import ScenePosterior
from probdeblend.simulate import BlendConfig, Frame, blend_scene

sys.path.insert(0, str(Path(__file__).parent))
B_BINS = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.01)]
SNR_BINS = [(0, 20), (20, 50), (50, 200), (200, 1e9)]
ALL_METHODS = ("amortized", "laplace", "auto", "nuts", "catalog", "sep")
TAGGED = ("amortized", "laplace", "auto", "nuts", "catalog")


def nmad(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else np.nan


def scene_of(family: str, i: int):
    """The i-th scene of a family: (SimulatedScene, kind)."""
    if family == "a":
        cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=80), n_galaxies=(2, 4),
                          max_shift=0.2, annulus=(0.5, 3.0), psf_fwhm_range=(0.9, 1.2))
        return blend_scene(cfg, seed=10_000_000 + i), "own"
    from shifted_scenes import KINDS, shifted_scene

    kind = KINDS[i % len(KINDS)]
    return shifted_scene(kind, seed=20_000_000 + i), kind


def hits(draws, truth):
    d = np.asarray(draws, float)
    d = d[np.isfinite(d)]
    if not len(d):
        return np.nan, np.nan
    lo68, hi68, lo95, hi95 = np.percentile(d, [16, 84, 2.5, 97.5])
    return float(lo68 <= truth <= hi68), float(lo95 <= truth <= hi95)


def _half_width(draws) -> float:
    """Half the 16-84 % range of finite draws (NaN without any)."""
    d = np.asarray(draws, float)
    d = d[np.isfinite(d)]
    return float(np.diff(np.percentile(d, [16, 84]))[0] / 2) if len(d) else np.nan


def image_metrics(mean_img, truth_img):
    """Relative MSE, PSNR and SSIM of the deblended target image (posterior mean, bands summed)
    against its isolated noiseless truth (data range = the truth's range)."""
    a = np.asarray(mean_img, np.float64).sum(0)
    b = np.asarray(truth_img, np.float64).sum(0)
    rng = float(b.max() - b.min())
    return {"mse_rel": float(np.mean((a - b) ** 2) / np.mean(b**2)),
            "psnr": float(psnr(a, b, data_range=rng)), "ssim": float(ssim(a, b, data_range=rng))}


def row_of(family, kind, method, i, sim, r_idx, flux_r, e1, e2, seconds, **extra):
    t = sim.truth[0]
    tf, g1, g2 = float(t["flux_r"]), float(t["g1"]), float(t["g2"])
    row = {"family": family, "kind": kind, "method": method, "scene": i,
           "flux_rel": float(np.median(flux_r) / tf - 1), "e1": float(np.nanmedian(e1)),
           "e2": float(np.nanmedian(e2)), "g1": g1, "g2": g2, "snr": float(t["snr"]),
           "blend": float(t["blendedness_total"]), "seconds": seconds,
           "n_sources": len(sim.truth)}
    row["cov68_flux"], row["cov95_flux"] = hits(flux_r, tf)
    # posterior widths (16-84 % half-range): the error / width ratio behind the coverage
    row["sd_flux_rel"] = _half_width(flux_r) / tf
    row["sd_e1"], row["sd_e2"] = _half_width(e1), _half_width(e2)
    for k, (e, g) in {"e1": (e1, g1), "e2": (e2, g2)}.items():
        row[f"cov68_{k}"], row[f"cov95_{k}"] = hits(e, g)
    row.update(extra)
    return row


_ENCODERS: dict = {}


def _encoder(path):
    """The shipped encoder ("auto") or one loaded from a card path (e.g. an older recipe)."""
    if path == "auto":
        return "auto"
    if path not in _ENCODERS:
        from probdeblend.amortized import load_amortized

        _ENCODERS[path] = load_amortized(path)
    return _ENCODERS[path]


def measure_scene(family, i, methods, prior, args) -> list[dict]:
    sim, kind = scene_of(family, i)
    scene = sim.to_scene()
    r_idx = list(prior.bands).index("r")
    n, rows = args.num_samples, []
    post = None
    if set(methods) & {"amortized", "laplace", "auto", "nuts"}:
        t0 = time.perf_counter()
        post = ScenePosterior(scene, prior, model_error=args.model_error,
                              encoder=_encoder(args.encoder))
        t_ctx = time.perf_counter() - t0
    q_row = None
    if set(methods) & {"amortized", "auto"}:
        t0 = time.perf_counter()
        d = post.amortized(n, seed=i, refine=args.refine)
        v = post.measure(d)  # flux / e straight from q (no decode per draw)
        t_q = t_ctx + time.perf_counter() - t0
        img = image_metrics(post.source_images(d, max_draws=8)[0][0], sim.noiseless[0])
        chi2 = q_residual_chi2(post)
        q_row = row_of(family, kind, "amortized", i, sim, r_idx, v["flux"][0, :, 0, r_idx],
                       v["e1"][0, :, 0], v["e2"][0, :, 0], t_q, q_chi2=float(np.max(chi2)),
                       **img)
        if "amortized" in methods:
            rows.append(q_row)
    lap_row = None
    if "laplace" in methods or ("auto" in methods and q_row["q_chi2"] > args.q_chi2_max):
        t0 = time.perf_counter()
        d = post.laplace(n, seed=i)
        v = post.measure(d)
        t_l = t_ctx + time.perf_counter() - t0
        img = image_metrics(post.source_images(d, max_draws=8)[0][0], sim.noiseless[0])
        lap_row = row_of(family, kind, "laplace", i, sim, r_idx, v["flux"][0, :, 0, r_idx],
                         v["e1"][0, :, 0], v["e2"][0, :, 0], t_l,
                         pareto_k=float(d.info["pareto_k"]), engine=d.method,
                         e_failed=float(np.mean(~np.isfinite(v["e1"][0, :, 0]))), **img)
        if "laplace" in methods:
            rows.append(lap_row)
    if "auto" in methods:
        use_q = q_row["q_chi2"] <= args.q_chi2_max
        src = q_row if use_q else lap_row
        extra_t = 0.0 if use_q else q_row["seconds"] - t_ctx
        rows.append({**src, "method": "auto", "seconds": src["seconds"] + extra_t,
                     "path": "amortized" if use_q else "laplace",
                     "wants_nuts": bool(not use_q and lap_row["pareto_k"] > 0.7)})
    if "nuts" in methods:
        rows.append(_nuts_row(family, kind, i, sim, post, r_idx, t_ctx, args))
    if "catalog" in methods:
        rows.append(_catalog_row(family, kind, i, sim, scene, r_idx, args))
    if "sep" in methods:
        t0 = time.perf_counter()
        tab = sep_baseline(scene)
        t = sim.truth[0]
        j = match_positions(tab, np.array([[t["x"], t["y"]]]), max_distance=2.0)[0] \
            if len(tab) else -1
        if j >= 0:
            rows.append(row_of(family, kind, "sep", i, sim, r_idx, [float(tab["flux_r"][j])],
                               [float(tab["g1"][j])], [float(tab["g2"][j])],
                               time.perf_counter() - t0))
        else:
            rows.append({"family": family, "kind": kind, "method": "sep_missed", "scene": i})
    return rows


def _catalog_row(family, kind, i, sim, scene, r_idx, args) -> dict:
    """The survey path on this scene: ``probdeblend.deblend`` with the true positions
    (amortized q + per-group closed-form photometry, what a catalogue gets), timed end to end;
    the target's draws are read back from ``draws_dir``."""
    import tempfile

    import arviz as az

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cat = pb.deblend(scene, prior=args.prior, num_samples=args.num_samples, seed=i,
                         draws_dir=tmp)
        seconds = time.perf_counter() - t0
        row = int(np.flatnonzero(np.asarray(cat["id"]) == 0)[0])  # the target: truth row 0
        post = az.from_netcdf(Path(tmp) / f"group_{int(cat['group'][row]):06d}.nc").posterior
        tgt = post.sel(source=0)
        flux_r = np.asarray(tgt["flux"].sel(band=scene.bands[r_idx])).ravel()
        e1, e2 = np.asarray(tgt["e1"]).ravel(), np.asarray(tgt["e2"]).ravel()
    return row_of(family, kind, "catalog", i, sim, r_idx, flux_r, e1, e2, seconds)


def _nuts_row(family, kind, i, sim, post, r_idx, t_ctx, args) -> dict:
    """NUTS on the whole scene (``args.num_samples`` draws over ``args.nuts_chains`` chains
    after ``args.nuts_warmup`` warm-up each); the row adds R-hat, bulk ESS of the target's
    r flux, e1, e2, and the divergences."""
    import arviz as az

    from probdeblend.scene_posterior import NutsConfig

    chains = int(args.nuts_chains)
    t0 = time.perf_counter()
    cfg = NutsConfig(num_warmup=int(args.nuts_warmup), num_chains=chains)
    d = post.nuts(max(1, args.num_samples // chains), seed=i, config=cfg)
    v = post.measure(d)  # (chain, draw, source, ...)
    t_n = t_ctx + time.perf_counter() - t0
    img = image_metrics(post.source_images(d, max_draws=8)[0][0], sim.noiseless[0])
    per = {"flux_r": v["flux"][:, :, 0, r_idx], "e1": v["e1"][:, :, 0], "e2": v["e2"][:, :, 0]}
    diag = {}
    for name, a in per.items():
        a = np.asarray(a, float)
        diag[f"ess_{name}"] = float(az.ess(a, method="bulk")) if np.isfinite(a).all() else np.nan
        diag[f"rhat_{name}"] = float(az.rhat(a)) if np.isfinite(a).all() else np.nan
    return row_of(family, kind, "nuts", i, sim, r_idx, per["flux_r"].ravel(),
                  per["e1"].ravel(), per["e2"].ravel(), t_n, engine=d.method,
                  divergences=int(np.sum(d.sample_stats.get("diverging", 0))),
                  chain_method=d.info.get("chain_method", ""),
                  draws=int(np.asarray(per["flux_r"]).size), **diag, **img)


def run(args):
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["family"], r["method"].replace("sep_missed", "sep"), r["scene"])
            for r in load_rows(rows_path)}
    prior = pb.load_prior(args.prior)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(ALL_METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {ALL_METHODS}")
    def tagged(m):
        return m + args.tag if m in TAGGED else m

    todo = [(i, [m for m in methods if (args.family, tagged(m), i) not in done])
            for i in range(args.start, args.n)]
    todo = [(i, ms) for i, ms in todo if ms]
    from tqdm.auto import tqdm

    t_all = time.perf_counter()
    with rows_path.open("a") as fh:
        for i, ms in tqdm(todo, desc=f"family {args.family}"):
            for row in measure_scene(args.family, i, ms, prior, args):
                if args.tag and row["method"] in TAGGED:
                    row["method"] += args.tag
                fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
    log_run(out, args.argv, time.perf_counter() - t_all, len(todo))
    report(out, args)


def _m_fit(g, e):
    ok = np.isfinite(g) & np.isfinite(e)
    if ok.sum() < 5:
        return np.nan, np.nan
    A = np.stack([g[ok], np.ones(ok.sum())], -1)
    coef, res, *_ = np.linalg.lstsq(A, e[ok], rcond=None)
    resid = e[ok] - A @ coef
    cov = np.linalg.inv(A.T @ A) * resid.var()
    return float(coef[0] - 1), float(np.sqrt(cov[0, 0]))


def summarize(rs: list[dict]) -> dict:
    f = np.array([r["flux_rel"] for r in rs])
    snr = np.array([r["snr"] for r in rs])
    g = np.concatenate([[r["g1"] for r in rs], [r["g2"] for r in rs]])
    e = np.concatenate([[r["e1"] for r in rs], [r["e2"] for r in rs]])
    m, m_err = _m_fit(g, e)
    out = {"n": len(rs), "flux_med": float(np.median(f)), "flux_nmad": nmad(f),
           "flux_nmad_snr20": nmad(f[snr > 20]),
           "e1_nmad": nmad([r["e1"] - r["g1"] for r in rs]),
           "e2_nmad": nmad([r["e2"] - r["g2"] for r in rs]), "m": m, "m_err": m_err,
           "sec_med": float(np.median([r["seconds"] for r in rs]))}
    for k in ("flux", "e1", "e2"):
        for lvl in (68, 95):
            # sep gives a point estimate: no interval, no coverage
            vals = [r.get(f"cov{lvl}_{k}") for r in rs if r["method"] != "sep"]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            out[f"cov{lvl}_{k}"] = float(np.mean(vals)) if vals else np.nan
    for k in ("psnr", "ssim"):
        vals = [r[k] for r in rs if k in r and np.isfinite(r[k])]
        out[k] = float(np.median(vals)) if vals else np.nan
    return out


def _fmt(s):
    def c(k):
        a, b = s[f"cov68_{k}"], s[f"cov95_{k}"]
        return "-" if not np.isfinite(a) else f"{a:.2f} / {b:.2f}"

    img = "-" if not np.isfinite(s["psnr"]) else f"{s['psnr']:.1f} / {s['ssim']:.2f}"
    return (f"| {s['n']} | {s['flux_med']:+.3f} | {s['flux_nmad']:.3f} | "
            f"{s['flux_nmad_snr20']:.3f} | {s['e1_nmad']:.3f} / {s['e2_nmad']:.3f} | "
            f"{s['m']:+.3f} ± {s['m_err']:.3f} | {c('flux')} | {c('e1')} | {c('e2')} | {img} | "
            f"{s['sec_med']:.2f} |")


HEAD = ("| method | n | r-flux median | NMAD | NMAD SNR>20 | e1 / e2 NMAD (vs true g) | m | "
        "cov 68/95 flux | cov e1 | cov e2 | PSNR / SSIM | s/scene |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _nuts_lines(fr: list[dict]) -> list[str]:
    """The reference comparison: every method on the scenes NUTS ran on, and NUTS's own
    diagnostics (R-hat, bulk ESS of the target's r flux, e1, e2; divergences)."""
    lines = []
    for suffix in ("", "_uncond"):
        lines += _nuts_lines_of(fr, suffix)
    return lines


def _nuts_lines_of(fr: list[dict], suffix: str) -> list[str]:
    """:func:`_nuts_lines` for the rows of one model version (``suffix`` of the method)."""
    nuts = [r for r in fr if r["method"] == "nuts" + suffix]
    if not nuts:
        return []
    subset = {r["scene"] for r in nuts}
    lines = ["", f"Same {len(subset)} scenes as NUTS{suffix} (the reference; every method "
                 "restricted to the scenes NUTS ran on):", "", HEAD]
    for m in [m + suffix for m in ("laplace", "auto", "nuts")] + ["amortized"]:
        rs = [r for r in fr if r["method"] == m and r["scene"] in subset]
        if rs:
            lines.append(f"| {m} " + _fmt(summarize(rs)))
    rh = np.array([[r.get(f"rhat_{k}", np.nan) for k in ("flux_r", "e1", "e2")] for r in nuts])
    es = np.array([[r.get(f"ess_{k}", np.nan) for k in ("flux_r", "e1", "e2")] for r in nuts])
    lines += ["", f"NUTS diagnostics over {len(nuts)} scenes ({nuts[0]['draws']} draws each): "
                  f"max R-hat {np.nanmax(rh):.3f} (median {np.nanmedian(rh):.3f}); "
                  f"bulk ESS of the target's r flux / e1 / e2: median "
                  f"{np.nanmedian(es):.0f}, min {np.nanmin(es):.0f}; scenes with divergences: "
                  f"{sum(r.get('divergences', 0) > 0 for r in nuts)}."]
    return lines


def report(out: Path, args):
    rows = load_rows(out / "rows.jsonl")
    lines = ["# Deblending benchmark", "",
             f"Machine: {platform.machine()}, 2 CPU cores (shared with other jobs while "
             f"measured). Rows: `rows.jsonl`. Generated by `benchmarks/deblend_benchmark.py`.",
             "", "Method names: untagged = prior `lsst-vae` with its shipped encoder "
             "`lsst-vae-amortized` (v0.4: NPE on one GPU, 1.41 M scenes; `amortized` = q + "
             "closed-form photometry with the residual redistributed, "
             "`probdeblend.photometry.REDISTRIBUTE`); `_vaegan` = prior `lsst-vaegan` with "
             "`lsst-vaegan-amortized` (v0.4, 1.22 M scenes); `_v03` = the previous encoders "
             "(0.79 M / 0.41 M scenes, the VAE-GAN one stopped inside its warm-up) with "
             "least-squares photometry; `_v02` = the v0.2 encoder (q's own log-normal "
             "fluxes; its `auto` ladder checked q's mean fluxes). "
             "`_refine40` = `amortized(refine=40)`: 40 L-BFGS iterations of the scene from "
             "q's mean, q re-centred there, photometry (least squares) with the refined "
             "calibration. `laplace` / `auto`: MAP from the v0.4 q with photometric fluxes, "
             "L-BFGS preconditioned by the Gauss-Newton curvature, Gauss-Newton Laplace "
             "covariance, PSIS with pilot, the prior's magnitude-conditioned latent map "
             "(`docs/priors.md`), the flux model-error term of the encoder card "
             "(`calibration.laplace`: fractional, growing with the band-summed S/N and the "
             "blendedness at the MAP, Student-t on the whole error, fitted by maximum "
             "likelihood on every source of held-out scenes 500-799, "
             "`calibrate_photometry.py --laplace --blend-model`, refitted 2026-12-07 on "
             "scenes that state their PSF images' flux fraction); `laplace_vaegan`: "
             "the same with prior `lsst-vaegan` and its encoder and card, 100 scenes), e of "
             "the unweighted Laplace draws linearised around the MAP "
             "(`LaplaceConfig(shapes='auto')`) and the shape model-error term of the card "
             "(`calibration.laplace.shape_sys` 0.006 in half the conformal shear, df 10, "
             "fitted on the targets of scenes 500-739); `_noesys` the same without the shape "
             "term (the run before it); `_decoded` the same with e measured on each "
             "decoded draw (before the linearised shapes; they shrink e, m ~ -0.06); "
             "`_uncond` the same with the prior before its magnitude-conditioned map and "
             "the term fitted then (flux_sys 0.016, df 3); "
             "`_sys08` the same with the first calibration (0.008, df 4, 100 held-out "
             "scenes); `_nosys` the same without that term; `nuts`: NumPyro NUTS from the "
             "MAP with the Laplace mass matrix, 2 chains x (100 warm-up + 100 draws), chains "
             "one after the other, except family (a) scenes 8-15: one per core on two "
             "threads (`chain_method` in the rows; the same draws, less wall time; "
             "`nuts_uncond`: with the prior before the map); "
             "`_v04exact` the same with plain L-BFGS and the "
             "exact Hessian (before the decoder ran in CPU blocks); `laplace_v02` with the "
             "v0.2 encoder's q as the MAP's starting point. Rows of earlier calibration "
             "stages (`_gsys`, `_rawq`, `_sup`), and the `_gn1` laplace / auto rows (the same "
             "algorithm before the products of draws moved to the torch decoder; same "
             "accuracy, 6.3 / 6.9 s per scene), are kept in `rows_archive.jsonl`. "
             "`catalog`: the survey path, `probdeblend.deblend` on the scene with the true "
             "positions (q's offset and e draws, closed-form photometry per blend group), "
             "timed end to end per call (one scene per call: the fixed per-call costs "
             "dominate; its sources/s at survey scale are in `benchmarks/results/field`). "
             "`amortized` and `catalog` (and their `_vaegan` rows): the photometry's flux "
             "error model that grows with each source's blendedness, Student-t on the whole "
             "error, fitted by maximum likelihood on every source of held-out scenes 500-899 "
             "(`calibrate_photometry.py --blend-model --n-morph 8` / `--catalog`, "
             "2026-11-28). Untagged rows (2026-12-07 on): every scene states its PSF "
             "images' flux fraction (`Scene.psf_flux_fraction`, the light of the GalSim PSF "
             "inside its 41 px image, r band 0.992-0.995), so fluxes are total fluxes; "
             "`_2a72d01`: the rows of the code before (unit-sum PSF images taken to hold all "
             "the light, every flux low by the PSF's missing wings, ~0.6 %, and the "
             "laplace model-error term fitted on those fluxes); the `nuts`, `_vaegan` "
             "laplace and older tagged rows are of that convention too (their fluxes are "
             "~0.6 % lower than the same fit's total flux). Rows of earlier model-error "
             "terms (`_d596277`, `_acccd58`, `catalog_c29ef20`) are in "
             "`rows_archive.jsonl`.", ""]
    for fam, title in (("a", "Family (a): the project's own simulator"),
                       ("b", "Family (b): shifted populations (never seen in training)")):
        fr = [r for r in rows if r["family"] == fam]
        if not fr:
            continue
        lines += [f"## {title}", "", HEAD]
        order = {m: k for k, m in enumerate(ALL_METHODS)}
        present = sorted({r["method"] for r in fr} - {"sep_missed"},
                         key=lambda m: (order.get(m.split("_")[0], 9), m))
        for m in present:
            rs = [r for r in fr if r["method"] == m]
            lines.append(f"| {m} " + _fmt(summarize(rs)))
        miss = sum(r["method"] == "sep_missed" for r in fr)
        if miss:
            n_sep = sum(r["method"] in ("sep", "sep_missed") for r in fr)
            lines += ["", f"sep separated the target in {n_sep - miss} of {n_sep} scenes "
                          f"(its rows cover those only)."]
        for am in sorted({r["method"] for r in fr if r["method"].startswith("auto")}):
            auto = [r for r in fr if r["method"] == am]
            n_l = sum(r["path"] == "laplace" for r in auto)
            n_n = sum(r.get("wants_nuts", False) for r in auto)
            lines += ["", f"{am} ladder: {len(auto) - n_l} of {len(auto)} scenes kept q; "
                          f"{n_l} moved to laplace; {n_n} had Laplace+PSIS k-hat > 0.7 (NUTS "
                          f"wanted; not run here, their laplace rows are counted)."]
        lines += _nuts_lines(fr)
        if fam == "b":
            lines += ["", "Per shift (amortized | laplace | nuts):", "", HEAD]
            for kind in sorted({r["kind"] for r in fr}):
                for m in ("amortized", "laplace", "nuts"):
                    rs = [r for r in fr if r["method"] == m and r["kind"] == kind]
                    if rs:
                        lines.append(f"| {m} ({kind}) " + _fmt(summarize(rs)))
        lines += ["", "Per SNR bin (r-flux NMAD; e1 / e2 error NMAD and m vs true g and, "
                  "where rows have it, the median posterior sd of e (half the 16-84 % "
                  "range); 68/95% coverage of flux, e1, e2):", "",
                  "| method | " + " | ".join(f"SNR {lo}-{hi if hi < 1e8 else 'inf'}"
                                            for lo, hi in SNR_BINS) + " |",
                  "|---|" + "---|" * len(SNR_BINS)]
        for m in ("amortized", "laplace", "auto", "nuts", "catalog"):
            if not any(r["method"] == m for r in fr):
                continue
            cells = []
            for lo, hi in SNR_BINS:
                rs = [r for r in fr if r["method"] == m and lo <= r["snr"] < hi]
                cov = "; ".join(
                    f"{k} {np.nanmean([r[f'cov68_{k}'] for r in rs]):.2f}/"
                    f"{np.nanmean([r[f'cov95_{k}'] for r in rs]):.2f}"
                    for k in ("flux", "e1", "e2"))
                mm = _m_fit(np.array([r["g1"] for r in rs] + [r["g2"] for r in rs]),
                            np.array([r["e1"] for r in rs] + [r["e2"] for r in rs]))
                e_nmad = (f"e NMAD {nmad([r['e1'] - r['g1'] for r in rs]):.3f}/"
                          f"{nmad([r['e2'] - r['g2'] for r in rs]):.3f}, m {mm[0]:+.3f} ± "
                          f"{mm[1]:.3f}")
                sd = [r[k] for r in rs for k in ("sd_e1", "sd_e2") if k in r]
                e_sd = f" (posterior sd {np.nanmedian(sd):.3f})" if sd else ""
                cells.append("-" if len(rs) < 3 else
                             f"{nmad([r['flux_rel'] for r in rs]):.3f}; {e_nmad}{e_sd}; {cov} "
                             f"(n={len(rs)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Per blendedness bin (the target's true blendedness): r-flux NMAD; "
                  "68 / 95 % coverage of the r flux:", "",
                  "| method | " + " | ".join(f"B {lo}-{hi}" for lo, hi in B_BINS) + " |",
                  "|---|" + "---|" * len(B_BINS)]
        for m in ("amortized", "amortized_acccd58", "laplace", "nuts", "catalog",
                  "catalog_acccd58", "sep"):
            cells = []
            for lo, hi in B_BINS:
                rs = [r for r in fr if r["method"] == m and lo <= r["blend"] < hi]
                cov = [r for r in rs if m != "sep"]  # sep: no posterior
                cov = ("" if not cov else
                       f"; {np.mean([r['cov68_flux'] for r in cov]):.2f} / "
                       f"{np.mean([r['cov95_flux'] for r in cov]):.2f}")
                cells.append("-" if len(rs) < 3 else
                             f"{nmad([r['flux_rel'] for r in rs]):.3f}{cov} (n={len(rs)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    runs = load_rows(out / "runs.jsonl")
    if runs:
        lines += ["## Commands", ""] + command_lines("deblend_benchmark.py", runs)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(rows, out)
    print("\n".join(lines))


def plot(rows, out: Path):
    """``deblend_benchmark.png``. Top: r-flux error against S/N, and the empirical 68 / 95 %
    coverage of flux, e1 and e2 per method and family (on the diagonal: calibrated). Bottom:
    the scenes per S/N bin, and the 68 % coverage of flux, e1, e2 of laplace and auto per
    S/N bin (bins with >= 10 rows; grey: the issue's target, 0.68 +- 0.03; solid family (a),
    dashed (b))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 8.4))
    top, bottom = axes
    for fam, ls in (("a", "-"), ("b", "--")):
        for m, col in (("amortized", "C0"), ("laplace", "C1"), ("auto", "C3"), ("sep", "C2")):
            rs = [r for r in rows if r["family"] == fam and r["method"] == m]
            if len(rs) < 5:
                continue
            if m != "auto":
                snr = np.array([r["snr"] for r in rs])
                f = np.array([r["flux_rel"] for r in rs])
                top[0].scatter(snr, f, s=4, color=col, alpha=0.4,
                               marker="o" if fam == "a" else "x", label=f"{m} ({fam})")
            if m == "sep":
                continue
            for k, ax in (("flux", top[1]), ("e1", top[2]), ("e2", top[3])):
                cov = [np.nanmean([r.get(f"cov{lvl}_{k}", np.nan) for r in rs])
                       for lvl in (68, 95)]
                ax.plot([0.68, 0.95], cov, ls, marker="o", color=col, label=f"{m} ({fam})")
            if m == "amortized":
                continue
            for k, ax in (("flux", bottom[1]), ("e1", bottom[2]), ("e2", bottom[3])):
                x, y = [], []
                for j, (lo, hi) in enumerate(SNR_BINS):
                    b = [r[f"cov68_{k}"] for r in rs if lo <= r["snr"] < hi]
                    if len(b) >= 10:
                        x.append(j)
                        y.append(np.nanmean(b))
                ax.plot(x, y, ls, marker="o", color=col, label=f"{m} ({fam})")
    top[0].set(xscale="log", xlabel="target SNR", ylabel="r-flux relative error",
               ylim=(-0.6, 0.6), title="flux error vs SNR")
    top[0].axhline(0, color="k", lw=0.5)
    for ax, k in zip(top[1:], ("flux_r", "e1", "e2"), strict=True):
        ax.plot([0.6, 1], [0.6, 1], "k:", lw=0.8)
        ax.set(xlabel="nominal coverage", ylabel="empirical coverage", title=f"coverage of {k}",
               xlim=(0.6, 1), ylim=(0.3, 1))
    labels = [f"{lo}-{hi if hi < 1e8 else 'inf'}" for lo, hi in SNR_BINS]
    for ax, k in zip(bottom[1:], ("flux_r", "e1", "e2"), strict=True):
        ax.axhline(0.68, color="k", lw=0.8, ls=":")
        ax.axhspan(0.65, 0.71, color="0.85", zorder=0)
        ax.set(xticks=range(len(SNR_BINS)), xticklabels=labels, xlabel="target SNR bin",
               ylabel="68 % coverage", ylim=(0.3, 1), title=f"68 % coverage of {k} by SNR")
    # bottom-left: how many rows each bin holds (laplace, both families)
    for fam, col in (("a", "C1"), ("b", "C4")):
        n = [sum(r["family"] == fam and r["method"] == "laplace" and lo <= r["snr"] < hi
                 for r in rows) for lo, hi in SNR_BINS]
        bottom[0].bar(np.arange(len(SNR_BINS)) + (0.2 if fam == "b" else -0.2), n, width=0.4,
                      color=col, label=f"laplace rows ({fam})")
    bottom[0].set(xticks=range(len(SNR_BINS)), xticklabels=labels, xlabel="target SNR bin",
                  ylabel="scenes", title="scenes per SNR bin")
    bottom[0].legend(fontsize=7)
    top[0].legend(fontsize=7, markerscale=3)
    top[3].legend(fontsize=7)
    bottom[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "deblend_benchmark.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["a", "b"], default="a")
    ap.add_argument("--n", type=int, default=500, help="scenes 0..n-1 of the family")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--methods", default="amortized,sep")
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--q-chi2-max", type=float, default=1.5)
    ap.add_argument("--nuts-chains", type=int, default=2, help="chains of the nuts method")
    ap.add_argument("--nuts-warmup", type=int, default=150,
                    help="warm-up draws per chain of the nuts method")
    ap.add_argument("--model-error", type=float, default=0.0,
                    help="fractional model error of the likelihood (laplace / auto rows)")
    ap.add_argument("--tag", default="", help="suffix of the method names in the rows")
    ap.add_argument("--refine", type=int, default=0,
                    help="amortized: L-BFGS iterations from q's mean first (tag the rows, "
                         "e.g. --tag _refine40)")
    ap.add_argument("--encoder", default="auto",
                    help="amortized encoder card path (default: the one shipped for the prior)")
    ap.add_argument("--prior", default="lsst-vae")
    ap.add_argument("--out", default="benchmarks/results/deblend")
    resumable_main(ap, run, report, argv)


if __name__ == "__main__":
    main()
