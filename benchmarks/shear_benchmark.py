"""Shear-bias benchmark: multiplicative and additive shear biases m, c on blended LSST scenes.

    python benchmarks/shear_benchmark.py --n 300 --out benchmarks/results/shear

Every base scene (seed 40_000_000 + b; 80x80 px LSST ugrizy, a target near the centre plus 1-3
neighbours within 3", the deblending benchmark's layout) is drawn eight times: sheared by
(+g, 0), (-g, 0), (0, +g), (0, -g) with g = 0.02, each with its 90-degree rotated twin. All eight
copies share the catalogue, the PSFs and the noise realisation, so intrinsic shape noise cancels in
the rotated pairs and most pixel noise cancels in the +-g difference (Arcelin et al. 2021,
eqs. 8-9; Massey et al. 2007). For each estimator of the target's ellipticity e and each component
i, per base scene

    R_b = (e_i(+g) - e_i(-g)) / (2 g),   c_b = (e_i(+g) + e_i(-g)) / 2   (rotated twins averaged)

and m_i = mean(R_b) - 1, c_i = mean(c_b), each with the standard error of the mean over base
scenes. Estimators:

* ``probdeblend``: posterior mean of the target's e (GalSim reduced-shear convention, the
  REGAUSS shape of the decoded PSF-free galaxy) under the amortized posterior q;
* ``probdeblend-hier``: the hierarchical ensemble estimator :func:`probdeblend.shear.infer` run on
  the targets' posterior draws, once per applied shear (m from the four ensemble posteriors);
* ``oracle``: REGAUSS on the noiseless, isolated target in the r band with its own PSF (the
  shape estimator's own bias, no blending, no noise);
* ``sep``: windowed second moments of sep's detection of the target (no PSF correction; the
  classical baseline), when sep separates it.

Rows are appended to ``<out>/rows.jsonl`` per base scene, so runs resume; ``--report-only``
rebuilds the report.
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
from probdeblend.measure import psf_corrected_shape
from probdeblend.simulate import BlendConfig, Frame, blend_scene, with_shear

SHEARS = {"+1": (1, 0), "-1": (-1, 0), "+2": (0, 1), "-2": (0, -1)}
B_BINS = [(0.0, 0.1), (0.1, 0.3), (0.3, 1.01)]
SNR_BINS = [(0, 20), (20, 60), (60, np.inf)]
ESTIMATORS = ("probdeblend", "oracle", "sep")


def measure_copy(sim, prior, amortized, n_draws: int, seed: int) -> dict:
    """Target ellipticity of one sheared / rotated copy under every estimator."""
    import torch

    from probdeblend.scene_posterior import prepare_scene

    scene = prepare_scene(sim.to_scene(), prior)
    truth = sim.truth[0]
    out = {}
    # probdeblend: draws of q for the target, decoded, REGAUSS in the model frame
    q = amortized.predict(scene, scene.positions[:1])
    rng = np.random.default_rng(seed)
    z = q["z_loc"][0] + q["z_scale"][0] * rng.standard_normal((n_draws, q["z_loc"].shape[1]))
    with torch.no_grad():
        imgs = prior.decode(torch.as_tensor(z, dtype=torch.float32)).mean(-3).numpy()
    fr = prior.frame
    e1, e2 = psf_corrected_shape(imgs, fr.psf_image(25), fr.pixel_scale)
    out["draws"] = np.stack([e1, e2], -1).astype(np.float32)
    out["probdeblend"] = (float(np.nanmean(e1)), float(np.nanmean(e2)))
    # oracle: the noiseless isolated target, r band, scene PSF
    r = list(sim.bands).index("r")
    out["oracle"] = tuple(float(v) for v in psf_corrected_shape(
        sim.noiseless[0, r], sim.psf[r], sim.pixel_scale))
    # sep
    tab = sep_baseline(scene)
    j = match_positions(tab, np.array([[truth["x"], truth["y"]]]), max_distance=2.0)[0] \
        if len(tab) else -1
    out["sep"] = (float(tab["g1"][j]), float(tab["g2"][j])) if j >= 0 else (np.nan, np.nan)
    return out


def run(args):
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

    from probdeblend.scene_posterior import PRIORS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = pb.load_prior(args.prior)
    amortized = PRIORS.encoder(prior)
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=80), n_galaxies=(2, 4),
                      max_shift=0.2, annulus=(0.5, 3.0), psf_fwhm_range=(0.9, 1.2))
    rows_path = out / "rows.jsonl"
    done = {r["base"] for r in load_rows(rows_path)}
    todo = [b for b in range(args.n) if b not in done]
    t_all = time.perf_counter()
    (out / "draws").mkdir(exist_ok=True)
    with rows_path.open("a") as fh:
        for b in tqdm(todo, desc="base scenes"):
            t0 = time.perf_counter()
            row = {"base": b}
            draws = {}
            for key, (s1, s2) in SHEARS.items():
                conf = with_shear(cfg, s1 * args.g, s2 * args.g)
                for rot in (False, True):
                    sim = blend_scene(conf, seed=40_000_000 + b, rotate90=rot)
                    res = measure_copy(sim, prior, amortized, args.draws, seed=b)
                    tag = f"{key}{'r' if rot else ''}"
                    for est in ESTIMATORS:
                        row[f"{est}_{tag}"] = res[est]
                    draws[tag] = res["draws"]
            truth = sim.truth[0]
            row.update(snr=float(truth["snr"]), blend=float(truth["blendedness_total"]),
                       n_gal=len(sim.truth), seconds=time.perf_counter() - t0)
            np.savez_compressed(out / "draws" / f"{b:05d}.npz", **draws)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    log_run(out, args.argv, time.perf_counter() - t_all, len(todo))
    report(out, args)


def pair_estimates(rows, est: str, comp: int, g: float):
    """Per-base-scene response R_b and additive term c_b for one estimator and component."""
    p, m = ("+1", "-1") if comp == 0 else ("+2", "-2")
    e = {k: np.array([[r[f"{est}_{k}"][comp], r[f"{est}_{k}r"][comp]] for r in rows])
         for k in (p, m)}
    plus, minus = np.mean(e[p], 1), np.mean(e[m], 1)  # rotated twins averaged (nan if missing)
    return (plus - minus) / (2 * g), (plus + minus) / 2


def mc(rows, est, comp, g):
    """m, c and their standard errors (mean over base scenes with finite values)."""
    R, c = pair_estimates(rows, est, comp, g)
    ok = np.isfinite(R) & np.isfinite(c)
    n = int(ok.sum())
    if n < 3:
        return {"m": np.nan, "m_err": np.nan, "c": np.nan, "c_err": np.nan, "n": n}
    return {"m": float(R[ok].mean() - 1), "m_err": float(R[ok].std(ddof=1) / np.sqrt(n)),
            "c": float(c[ok].mean()), "c_err": float(c[ok].std(ddof=1) / np.sqrt(n)), "n": n}


def _hier_m_c(out: Path, rows, g: float, sigma_e: float, n_grid: int = 81):
    """m, c per component from shear.infer on the ensembles of each applied shear."""
    from probdeblend import shear

    post = {}
    for key in SHEARS:
        ens = []
        for r in rows:
            d = np.load(out / "draws" / f"{r['base']:05d}.npz")
            ens += [d[key], d[key + "r"]]
        post[key] = shear.infer(np.stack(ens), sigma_e=sigma_e, n_grid=n_grid).attrs
    res = {}
    for comp, (p, m) in enumerate((("+1", "-1"), ("+2", "-2"))):
        gp, gm = post[p][f"g{comp + 1}_mean"], post[m][f"g{comp + 1}_mean"]
        res[comp] = ((gp - gm) / (2 * g) - 1, (gp + gm) / 2)
    return res


def hierarchical(out: Path, rows, g: float, sigma_e: float, n_jack: int = 10):
    """m, c from the ensemble shear posteriors of shear.infer (one per applied shear), with
    delete-a-group jackknife errors over base scenes: the +-g ensembles share galaxies and noise,
    so the posterior widths (shape noise / sqrt N) would overstate the error of m."""
    full = _hier_m_c(out, rows, g, sigma_e)
    groups = np.array_split(np.arange(len(rows)), n_jack)
    jack = [_hier_m_c(out, [r for i, r in enumerate(rows) if i not in set(grp)], g, sigma_e,
                      n_grid=41) for grp in groups]
    res = {}
    for comp in (0, 1):
        ms = np.array([j[comp][0] for j in jack])
        cs = np.array([j[comp][1] for j in jack])
        f = (n_jack - 1) / n_jack
        res[comp] = {"m": full[comp][0], "c": full[comp][1], "n": len(rows),
                     "m_err": float(np.sqrt(f * np.sum((ms - ms.mean()) ** 2))),
                     "c_err": float(np.sqrt(f * np.sum((cs - cs.mean()) ** 2)))}
    return res


def report(out: Path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(out / "rows.jsonl")
    if not rows:
        raise SystemExit(f"no rows in {out / 'rows.jsonl'}; run the benchmark first")
    runs = load_rows(out / "runs.jsonl")
    wall = sum(r["wall_s"] for r in runs)
    g = args.g
    table = {est: {c: mc(rows, est, c, g) for c in (0, 1)} for est in ESTIMATORS}
    sigma_e = pb.shear.interim_sigma(pb.load_prior(args.prior))
    table["probdeblend-hier"] = hierarchical(out, rows, g, sigma_e)
    sep_ok = np.mean([np.isfinite(r["sep_+1"][0]) for r in rows])
    lines = ["# Shear-bias benchmark", "", "Commands (resumable; rows appended per base scene):",
             ""]
    lines += command_lines("shear_benchmark.py", runs, "base scenes")
    lines += ["", f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores, CPU "
              f"only; total wall time {wall / 60:.1f} min for {len(rows)} base scenes x 8 "
              f"copies = {8 * len(rows)} scenes ({wall / max(8 * len(rows), 1):.2f} s/scene). "
              f"Applied shear |g| = {g}. Prior `{args.prior}`; interim sigma_e = "
              f"{sigma_e:.3f}. sep separated the target in {100 * sep_ok:.0f}% of scenes "
              "(its m, c use those).", "",
              "| estimator | n | m1 | m2 | c1 (x1e-3) | c2 (x1e-3) |", "|---|---|---|---|---|---|"]
    for est, t in table.items():
        lines.append(
            f"| {est} | {t[0]['n']} | {t[0]['m']:+.4f} +- {t[0]['m_err']:.4f} | "
            f"{t[1]['m']:+.4f} +- {t[1]['m_err']:.4f} | {1e3 * t[0]['c']:+.2f} +- "
            f"{1e3 * t[0]['c_err']:.2f} | {1e3 * t[1]['c']:+.2f} +- {1e3 * t[1]['c_err']:.2f} |")
    lines += ["", "m1 (+- 1 sigma) by the target's blendedness B_total and r-band SNR:", "",
              "| estimator | " + " | ".join(f"B in [{lo}, {hi})" for lo, hi in B_BINS) + " | "
              + " | ".join(f"SNR in [{lo}, {hi})" for lo, hi in SNR_BINS) + " |",
              "|---|" + "---|" * (len(B_BINS) + len(SNR_BINS))]
    binned = {}
    for est in ESTIMATORS:
        cells = []
        for key, bins in (("blend", B_BINS), ("snr", SNR_BINS)):
            for lo, hi in bins:
                sel = [r for r in rows if lo <= r[key] < hi]
                res = {c: mc(sel, est, c, g) for c in (0, 1)}
                binned[(est, key, lo)] = res
                cells.append(f"{res[0]['m']:+.3f} +- {res[0]['m_err']:.3f} (n={res[0]['n']})")
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
    lines += ["", "![m, c](shear_bias.png)", ""]
    # plots: m and c per estimator; m1 against blendedness and SNR
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    names = list(table)
    for comp, mk in ((0, "o"), (1, "s")):
        x = np.arange(len(names)) + (comp - 0.5) * 0.15
        ax[0].errorbar(x, [table[n][comp]["m"] for n in names],
                       [table[n][comp]["m_err"] for n in names], fmt=mk, label=f"m{comp + 1}")
    ax[0].axhspan(-0.01, 0.01, color="g", alpha=0.15, label="|m| < 0.01")
    ax[0].set_xticks(range(len(names)), names, rotation=15)
    ax[0].set(ylabel="m", title="multiplicative bias")
    ax[0].legend(fontsize=8)
    for j, (key, bins, lab) in enumerate((("blend", B_BINS, "target blendedness B_total"),
                                          ("snr", SNR_BINS, "target r-band SNR"))):
        for est in ESTIMATORS:
            xs = np.arange(len(bins))
            ax[j + 1].errorbar(xs, [binned[(est, key, lo)][0]["m"] for lo, _ in bins],
                               [binned[(est, key, lo)][0]["m_err"] for lo, _ in bins],
                               fmt="o-", label=est, capsize=3)
        ax[j + 1].set_xticks(range(len(bins)), [f"[{lo}, {hi})" for lo, hi in bins])
        ax[j + 1].axhline(0, color="k", lw=0.5)
        ax[j + 1].set(xlabel=lab, ylabel="m1")
        ax[j + 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "shear_bias.png", dpi=100)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps(
        {"table": {k: {str(c): v for c, v in t.items()} for k, t in table.items()},
         "wall_s": wall, "n_base": len(rows), "g": g, "sigma_e": sigma_e, "runs": runs},
        indent=2, default=float))
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="base scenes (x 8 sheared/rotated copies)")
    p.add_argument("--g", type=float, default=0.02, help="applied shear per component")
    p.add_argument("--draws", type=int, default=64, help="posterior draws per target")
    p.add_argument("--prior", default="lsst-vae")
    p.add_argument("--out", default="benchmarks/results/shear")
    resumable_main(p, run, report, argv)


if __name__ == "__main__":
    main()
