"""Deblending benchmark: accuracy, calibration and speed of probdeblend on simulated LSST blends.

    python benchmarks/deblend_benchmark.py --n 500 --n-svi 60 --n-nuts 12 \
        --out benchmarks/results/deblend

Rows are appended to ``<out>/rows.jsonl`` per (method, scene) as they are measured, and a run
skips what is already there, so the slow methods can run separately (``--methods nuts``) and
``--report-only`` rebuilds the report from whatever has been measured.

Scenes: 80x80 px LSST ugrizy at 0.2"/px, a target within 0.2" of the centre plus 1-3 neighbours
within 0.5-3" of it, r = 20-25.3 (the simulator's population), per-band Kolmogorov PSFs with the
FWHM scaled by U(0.9, 1.2), variance = sky + source counts. Seeds 10_000_000 + i, disjoint from
the training sets. Source positions are the true ones (this benchmark measures deblending, not
detection; detection completeness of sep is reported separately).

Methods on the target (source 0): ``amortized`` (draws of the encoder's q), ``amortized+IS``
(q reweighted by the scene posterior, per source), ``svi`` and ``nuts`` (on the first scenes),
and ``sep`` (SExtractor-like Kron fluxes and windowed-moment shapes; the classical baseline).

Metrics: r-band flux relative error of the posterior median (median, NMAD) overall, for
SNR > 20, and per blendedness bin; ellipticity errors of e1, e2 and |e| against the true
reduced shear g (the catalogue value) and against the same REGAUSS estimator applied to the
true isolated galaxy in the model frame ("measured truth"); the multiplicative ellipticity bias
m from a fit e = (1 + m) g + c; the fraction of targets whose truth falls inside the central 68%
and 95% posterior intervals (flux_r, e1, e2); amortized throughput; NUTS wall time to 400
effective samples on 2-galaxy scenes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
from _resumable import command_lines, load_rows, log_run
from _resumable import main as resumable_main

import probdeblend as pb
from probdeblend.detection import match_positions, sep_baseline
from probdeblend.fit import FitContext, _amortized_draws, _derived, _load_amortized
from probdeblend.measure import psf_corrected_shape
from probdeblend.simulate import BlendConfig, Frame, blend_scene, render_galaxy

B_BINS = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.01)]


def nmad(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else np.nan


def measured_truth(row, prior):
    """REGAUSS shape of the true galaxy drawn alone in the prior's model frame."""
    fr = prior.frame
    frame = Frame(survey="lsst", stamp_size=fr.stamp_size, psf_fwhm=fr.psf_fwhm)
    imgs = [render_galaxy(row, b, frame) for b in frame.survey_obj]
    unit = np.mean([im / im.sum() for im in imgs], 0)
    g1, g2 = psf_corrected_shape(unit, fr.psf_image(25), fr.pixel_scale)
    return float(g1), float(g2)


def interval_hits(draws, truth):
    lo68, hi68, lo95, hi95 = np.nanpercentile(draws, [16, 84, 2.5, 97.5])
    return float(lo68 <= truth <= hi68), float(lo95 <= truth <= hi95)


def summarize_target(draws: dict, r_idx: int):
    """Posterior medians and draws of the target's flux_r, e1, e2 (source 0)."""
    f = draws["flux"][..., 0, r_idx].ravel()
    e1 = draws["e1"][..., 0].ravel()
    e2 = draws["e2"][..., 0].ravel()
    return {"flux_r": f, "e1": e1, "e2": e2}


def record(rows, name, i, post, truth, gm, seconds):
    f, e1, e2 = post["flux_r"], post["e1"], post["e2"]
    t_f, t1, t2 = float(truth["flux_r"]), float(truth["g1"]), float(truth["g2"])
    row = {"method": name, "scene": i, "flux_rel": np.median(f) / t_f - 1,
           "e1": np.nanmedian(e1), "e2": np.nanmedian(e2), "g1": t1, "g2": t2,
           "g1m": gm[0], "g2m": gm[1], "snr": float(truth["snr"]),
           "blend": float(truth["blendedness_total"]), "seconds": seconds}
    row["cov68_flux"], row["cov95_flux"] = interval_hits(f, t_f)
    for k, (e, t) in {"e1": (e1, gm[0]), "e2": (e2, gm[1])}.items():
        row[f"cov68_{k}"], row[f"cov95_{k}"] = interval_hits(e, t)
    rows.append(row)


ALL_METHODS = ("amortized", "is", "svi", "nuts", "sep")
NAMES = {"is": "amortized+IS"}


def run(args):
    """Measure every (method, scene) pair not yet in ``rows.jsonl``, appending as it goes."""
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = {(r["method"], r["scene"]) for r in load_rows(rows_path)}
    done |= {("sep", r["scene"]) for r in load_rows(out / "sep_missed.jsonl")}
    prior = pb.load_prior(args.prior)
    amortized = _load_amortized(prior)
    r_idx = list(prior.bands).index("r")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(ALL_METHODS) - {"throughput", "ess"}:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from "
                         f"{ALL_METHODS + ('throughput', 'ess')}")
    if "throughput" in methods and (args.redo or not (out / "throughput.json").exists()):
        (out / "throughput.json").write_text(json.dumps(throughput(amortized, prior, args)))
    limit = {"amortized": args.n, "sep": args.n, "is": args.n_is, "svi": args.n_svi,
             "nuts": args.n_nuts}
    todo = [(i, [m for m in ALL_METHODS if m in methods and i < limit[m]
                 and (NAMES.get(m, m), i) not in done]) for i in range(args.n)]
    todo = [(i, ms) for i, ms in todo if ms]
    from tqdm.auto import tqdm

    t_all = time.perf_counter()
    with rows_path.open("a") as fh:
        for i, ms in tqdm(todo, desc="scenes"):
            new = measure_scene(i, ms, prior, amortized, r_idx, args)
            for row in new:
                if row["method"] == "sep_missed":
                    with (out / "sep_missed.jsonl").open("a") as miss:
                        miss.write(json.dumps(row) + "\n")
                else:
                    fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
    if "ess" in methods and (args.redo or not (out / "nuts_ess.json").exists()):
        (out / "nuts_ess.json").write_text(json.dumps(nuts_time_to_ess(prior, amortized, args)))
    log_run(out, args.argv, time.perf_counter() - t_all, len(todo))
    report(out, args)


def benchmark_scene(i: int):
    """The i-th benchmark scene (seed 10_000_000 + i) and its target's truth row."""
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=80), n_galaxies=(2, 4),
                      max_shift=0.2, annulus=(0.5, 3.0), psf_fwhm_range=(0.9, 1.2))
    sim = blend_scene(cfg, seed=10_000_000 + i)
    return sim.to_scene(), sim.truth[0]


def measure_scene(i, methods, prior, amortized, r_idx, args) -> list[dict]:
    """Rows for scene ``i`` and each of ``methods`` (target = source 0)."""
    scene, truth = benchmark_scene(i)
    gm = measured_truth(truth, prior)
    rows: list[dict] = []
    n = args.num_samples
    ctx = None
    if set(methods) - {"sep"}:
        t0 = time.perf_counter()
        ctx = FitContext(scene, prior, scene.positions, amortized)
        t_ctx = time.perf_counter() - t0
    if "amortized" in methods:
        t0 = time.perf_counter()
        draws, _ = _derived(ctx, ctx.sample_q(n, seed=i)[None])
        record(rows, "amortized", i, summarize_target(draws, r_idx), truth, gm,
               t_ctx + time.perf_counter() - t0)
    if "is" in methods:
        t0 = time.perf_counter()
        flats, ks = _amortized_draws(ctx, n, i, args.proposals)
        draws, _ = _derived(ctx, flats[None])
        record(rows, "amortized+IS", i, summarize_target(draws, r_idx), truth, gm,
               t_ctx + time.perf_counter() - t0)
        rows[-1]["pareto_k"] = float(ks[0])
    if "svi" in methods:
        from probdeblend.inference import run_svi

        t0 = time.perf_counter()
        loc, cov = ctx.q_flat()
        post = run_svi(ctx.problem, loc, cov, num_steps=args.svi_steps, num_samples=n, seed=i)
        draws, _ = _derived(ctx, ctx.problem.flatten_draws(post.samples))
        record(rows, "svi", i, summarize_target(draws, r_idx), truth, gm,
               t_ctx + time.perf_counter() - t0)
    if "nuts" in methods:
        from probdeblend.inference import find_map, laplace, run_nuts

        t0 = time.perf_counter()
        flat_map, _ = find_map(ctx.problem, ctx.init)
        cov = laplace(ctx.problem, flat_map)
        post = run_nuts(ctx.problem, flat_map, cov, num_warmup=args.nuts_warmup,
                        num_samples=args.nuts_samples, num_chains=args.nuts_chains, seed=i)
        draws, _ = _derived(ctx, ctx.problem.flatten_draws(post.samples))
        record(rows, "nuts", i, summarize_target(draws, r_idx), truth, gm,
               t_ctx + time.perf_counter() - t0)
    if "sep" in methods:
        t0 = time.perf_counter()
        tab = sep_baseline(scene)
        j = match_positions(tab, np.array([[truth["x"], truth["y"]]]), max_distance=2.0)[0] \
            if len(tab) else -1
        base = {"scene": i, "g1": float(truth["g1"]), "g2": float(truth["g2"]), "g1m": gm[0],
                "g2m": gm[1], "snr": float(truth["snr"]),
                "blend": float(truth["blendedness_total"]),
                "seconds": time.perf_counter() - t0}
        if j >= 0:
            rows.append({"method": "sep", **base,
                         "flux_rel": float(tab["flux_r"][j]) / float(truth["flux_r"]) - 1,
                         "e1": float(tab["g1"][j]), "e2": float(tab["g2"][j])})
        else:
            rows.append({"method": "sep_missed", **base})
    return rows


def throughput(amortized, prior, args):
    """Sources/s of the amortized encoder on one batch of 1024 cutouts (2 threads)."""
    import torch

    from probdeblend.amortized import measure_throughput

    torch.set_num_threads(2)
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=48), n_galaxies=(2, 4))
    scenes = [blend_scene(cfg, seed=20_000_000 + i).to_scene() for i in range(32)]
    parts = [amortized.cutouts(s, s.positions) for s in scenes]
    cut, sig = (np.concatenate([c[k] for c in parts]) for k in ("images", "sigmas"))
    fwhm = np.concatenate([np.broadcast_to(c["psf_fwhm"], c["sigmas"].shape) for c in parts])
    reps = int(np.ceil(1024 / len(cut)))
    cut, sig, fwhm = (np.concatenate([x] * reps)[:1024] for x in (cut, sig, fwhm))
    return measure_throughput(amortized, cut, sig, fwhm)


def nuts_time_to_ess(prior, amortized, args):
    """Wall time of the full NUTS path (MAP + Laplace + warm-up + sampling, compilation
    excluded by a first untimed run) on 2-galaxy scenes, and the minimum bulk ESS over every
    flux, e1 and e2 of both sources; time to 400 ESS = wall x 400 / min ESS."""
    import arviz as az

    from probdeblend.fit import fit

    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=64), n_galaxies=(2, 2),
                      annulus=(0.8, 1.6))
    out = []
    for k in range(args.n_ess + 1):  # first run compiles
        scene = blend_scene(cfg, seed=30_000_000 + k).to_scene()
        t0 = time.perf_counter()
        idata = fit(scene, prior=prior, method="nuts", num_samples=args.nuts_samples,
                    num_warmup=args.nuts_warmup, num_chains=args.nuts_chains, seed=k,
                    check=False)
        wall = time.perf_counter() - t0
        if k == 0:
            continue  # compilation run
        ess = az.ess(idata, var_names=["flux", "e1", "e2"])
        min_ess = float(min(float(ess[v].min()) for v in ("flux", "e1", "e2")))
        sampling = sum(idata.attrs.get(f"time_{t}", 0.0) for t in ("map_laplace_s", "nuts_s"))
        out.append({"wall_s": wall, "sampling_s": sampling, "min_ess": min_ess,
                    "time_to_400_ess_s": sampling * 400 / max(min_ess, 1e-9),
                    "mean_leapfrog_steps": idata.attrs.get("mean_leapfrog_steps"),
                    "chains": args.nuts_chains, "warmup": args.nuts_warmup,
                    "samples": args.nuts_samples})
    return out


def report(out: Path, args):
    """Aggregate ``rows.jsonl`` (and the throughput / NUTS timing files) into report.md + plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(out / "rows.jsonl")
    missed = load_rows(out / "sep_missed.jsonl")
    if not rows:
        raise SystemExit(f"no rows in {out / 'rows.jsonl'}; run the benchmark first")
    timing: dict = {}
    for r in rows:
        timing[r["method"]] = timing.get(r["method"], 0.0) + r.get("seconds", np.nan)
    speed = json.loads((out / "throughput.json").read_text()) \
        if (out / "throughput.json").exists() else {}
    nuts_speed = json.loads((out / "nuts_ess.json").read_text()) \
        if (out / "nuts_ess.json").exists() else []
    runs = load_rows(out / "runs.jsonl")
    wall = sum(r["wall_s"] for r in runs)
    sep_found = sum(r["method"] == "sep" for r in rows)
    n_sep = sep_found + len(missed)
    count = {m: len({r["scene"] for r in rows if r["method"] == m})
             for m in ("amortized", "amortized+IS", "svi", "nuts")}
    methods = [m for m in ("amortized", "amortized+IS", "svi", "nuts", "sep")
               if any(r["method"] == m for r in rows)]
    table = {}
    lines = ["# Deblending benchmark", "",
             "Commands (rows are appended per (method, scene) and resumed, so a report can "
             "gather several runs):", ""]
    lines += command_lines("deblend_benchmark.py", runs)
    lines += ["",
             f"Machine: {platform.processor() or platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, CPU only; total wall time {wall / 60:.1f} "
             f"min. Prior `{args.prior}`. Scenes: LSST 80x80 ugrizy blends (target + 1-3 "
             f"neighbours within 3\"); amortized on {count['amortized']}, importance "
             f"reweighting on {count['amortized+IS']}, SVI on {count['svi']}, NUTS on "
             f"{count['nuts']} (always the first scenes of the same seeded list).", "",
             f"sep detected the target as a separate source (within 2 px) in {sep_found} of "
             f"{n_sep} scenes ({100 * sep_found / max(n_sep, 1):.0f}%); its metrics are on "
             "those.", "",
             "| method | n | flux_r rel. err median | NMAD | NMAD (SNR>20) | median (SNR>20) |"
             " e1 err NMAD | e2 err NMAD | \\|e\\| err median | m (vs g) | m (vs measured) |"
             " cov68 flux | cov95 flux | cov68 e | cov95 e | s / scene |",
             "|" + "---|" * 16]
    for m in methods:
        R = [r for r in rows if r["method"] == m]
        fr = np.array([r["flux_rel"] for r in R])
        snr = np.array([r["snr"] for r in R])
        e = np.array([[r["e1"], r["e2"]] for r in R])
        g = np.array([[r["g1"], r["g2"]] for r in R])
        gm = np.array([[r["g1m"], r["g2m"]] for r in R])
        ok = np.all(np.isfinite(e), 1)
        de = e - g
        mabs = np.median(np.abs(np.hypot(*e[ok].T) - np.hypot(*g[ok].T)))
        m_g = float(np.polyfit(g[ok].ravel(), e[ok].ravel(), 1)[0] - 1) if ok.sum() > 3 else np.nan
        m_m = float(np.polyfit(gm[ok].ravel(), e[ok].ravel(), 1)[0] - 1) if ok.sum() > 3 \
            else np.nan
        cov = {k: np.mean([r[k] for r in R]) if k in R[0] else np.nan
               for k in ("cov68_flux", "cov95_flux", "cov68_e1", "cov95_e1", "cov68_e2",
                         "cov95_e2")}
        hi = snr > 20
        t = timing.get(m, np.nan) / max(len(R), 1)
        if m != "sep" and "pareto_k" in R[0]:
            ks = np.array([r["pareto_k"] for r in R])
            pk = {"pareto_k_median": float(np.median(ks)),
                  "frac_k_gt_0.7": float(np.mean(ks > 0.7))}
        else:
            pk = {}
        table[m] = {"n": len(R), "flux_median": float(np.median(fr)), "flux_nmad": nmad(fr),
                    "flux_nmad_snr20": nmad(fr[hi]), "flux_median_snr20": float(np.median(fr[hi])),
                    "e1_nmad": nmad(de[:, 0]), "e2_nmad": nmad(de[:, 1]), "abs_e_median": mabs,
                    "m_vs_g": m_g, "m_vs_measured": m_m, **cov, "s_per_scene": t, **pk,
                    "blend_bins": {}}
        for lo, hi_ in B_BINS:
            sel = np.array([lo <= r["blend"] < hi_ for r in R])
            table[m]["blend_bins"][f"{lo}-{hi_}"] = {
                "n": int(sel.sum()), "flux_nmad": nmad(fr[sel]) if sel.any() else np.nan,
                "flux_median": float(np.median(fr[sel])) if sel.any() else np.nan,
                "e1_nmad": nmad(de[sel, 0]) if sel.any() else np.nan}
        c = table[m]
        lines.append(
            f"| {m} | {c['n']} | {c['flux_median']:+.4f} | {c['flux_nmad']:.4f} | "
            f"{c['flux_nmad_snr20']:.4f} | {c['flux_median_snr20']:+.4f} | {c['e1_nmad']:.4f} | "
            f"{c['e2_nmad']:.4f} | {c['abs_e_median']:.4f} | {c['m_vs_g']:+.3f} | "
            f"{c['m_vs_measured']:+.3f} | {c['cov68_flux']:.2f} | {c['cov95_flux']:.2f} | "
            f"{np.nanmean([c['cov68_e1'], c['cov68_e2']]):.2f} | "
            f"{np.nanmean([c['cov95_e1'], c['cov95_e2']]):.2f} | {t:.2f} |")
    lines += ["", "Per blendedness bin (B_total of the target, r band): flux_r NMAD / median "
              "(n)", "", "| method | " + " | ".join(f"B in [{lo}, {hi})" for lo, hi in B_BINS)
              + " |", "|---|" + "---|" * len(B_BINS)]
    for m in methods:
        bins = table[m]["blend_bins"]
        lines.append(f"| {m} | " + " | ".join(
            f"{b['flux_nmad']:.3f} / {b['flux_median']:+.3f} ({b['n']})" for b in bins.values())
            + " |")
    if "amortized+IS" in table and "pareto_k_median" in table["amortized+IS"]:
        c = table["amortized+IS"]
        lines += ["", f"Pareto k-hat of the target's importance weights: median "
                  f"{c['pareto_k_median']:.2f}, k > 0.7 in {100 * c['frac_k_gt_0.7']:.0f}% of "
                  "scenes (where `fit(method='auto')` falls back to NUTS)."]
    if speed:
        lines += ["", f"Amortized encoder throughput: **{speed.get('sources_per_s', np.nan):.0f} "
                  f"sources/s** ({speed})."]
    if nuts_speed:
        first = nuts_speed[0]  # the settings the timing was measured with
        lines += ["", f"NUTS on 2-galaxy 64x64 scenes ({first['chains']} chains, "
                  f"{first['warmup']} warm-up + {first['samples']} draws each):", "",
                  "| scene | wall (s) | MAP+Laplace+NUTS (s) | min ESS (flux, e1, e2) | "
                  "time to 400 ESS (s) | mean leapfrog steps |", "|---|---|---|---|---|---|"]
        for k, s in enumerate(nuts_speed, 1):
            lines.append(f"| {k} | {s['wall_s']:.1f} | {s['sampling_s']:.1f} | "
                         f"{s['min_ess']:.0f} | {s['time_to_400_ess_s']:.1f} | "
                         f"{s['mean_leapfrog_steps']} |")
    # plots
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        R = [r for r in rows if r["method"] == m]
        centres = [0.5 * (lo + hi) for lo, hi in B_BINS]
        ax[0].plot(centres, [table[m]["blend_bins"][f"{lo}-{hi}"]["flux_nmad"]
                             for lo, hi in B_BINS], "o-", label=m)
        fr = np.array([r["flux_rel"] for r in R])
        ax[1].hist(np.clip(fr, -0.5, 0.5), bins=60, histtype="step", label=m)
        g = np.array([r["g1m"] for r in R])
        e = np.array([r["e1"] for r in R])
        ax[2].scatter(g, e, s=4, alpha=0.5, label=m)
    ax[0].set(xlabel="target blendedness B_total", ylabel="flux_r NMAD", yscale="log")
    ax[1].set(xlabel="flux_r relative error (clipped)", ylabel="targets")
    ax[2].plot([-0.7, 0.7], [-0.7, 0.7], "k:")
    ax[2].set(xlabel="measured true e1", ylabel="posterior median e1")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "deblend_benchmark.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["flux 68", "flux 95", "e1 68", "e1 95", "e2 68", "e2 95"]
    keys = ["cov68_flux", "cov95_flux", "cov68_e1", "cov95_e1", "cov68_e2", "cov95_e2"]
    w = 0.8 / max(1, len([m for m in methods if m != "sep"]))
    for j, m in enumerate([m for m in methods if m != "sep"]):
        ax.bar(np.arange(6) + j * w, [table[m][k] for k in keys], w, label=m)
    ax.plot([-0.2, 0.6], [0.68, 0.68], "k--")
    for x in (2, 4):
        ax.plot([x - 0.2, x + 0.6], [0.68, 0.68], "k--")
    for x in (1, 3, 5):
        ax.plot([x - 0.2, x + 0.6], [0.95, 0.95], "k--")
    ax.set_xticks(np.arange(6) + 0.3, labels)
    ax.set(ylabel="fraction of targets covered", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=100)
    lines += ["", "![accuracy](deblend_benchmark.png)", "", "![coverage](coverage.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps(
        {"table": table, "throughput": speed, "nuts": nuts_speed, "wall_s": wall,
         "timing_s": timing, "sep_detected": sep_found, "sep_scenes": n_sep, "runs": runs},
        indent=2, default=float))
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--n-is", type=int, default=200, help="scenes with importance reweighting")
    p.add_argument("--n-svi", type=int, default=60)
    p.add_argument("--n-nuts", type=int, default=12)
    p.add_argument("--n-ess", type=int, default=3, help="2-galaxy scenes timed to 400 ESS")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--proposals", type=int, default=256)
    p.add_argument("--svi-steps", type=int, default=500)
    p.add_argument("--nuts-warmup", type=int, default=200)
    p.add_argument("--nuts-samples", type=int, default=250)
    p.add_argument("--nuts-chains", type=int, default=4)
    p.add_argument("--methods", default="throughput,amortized,is,svi,nuts,sep,ess",
                   help="comma list from amortized,is,svi,nuts,sep,throughput,ess")
    p.add_argument("--redo", action="store_true", help="re-measure throughput / ess files")
    p.add_argument("--prior", default="lsst-vae")
    p.add_argument("--out", default="benchmarks/results/deblend")
    resumable_main(p, run, report, argv)


if __name__ == "__main__":
    main()
