"""Posteriors at the edges: a position on pure noise, faint galaxies (SNR 5-10).

    python benchmarks/edge_benchmark.py --n-noise 40 --n-faint 200 --n-laplace 40
    python benchmarks/edge_benchmark.py --methods amortized,amortized_q   # keeps laplace rows

* pure noise: an 48x48 LSST ugrizy scene of sky noise only, a source position at its centre;
  reported: the 95% interval of the r flux and whether its lower edge is below 1 sigma of the
  sky noise in a 2"-diameter aperture (the issue's target), for q and for laplace;
* faint: one isolated galaxy of the simulator's population at r-band SNR 5-10 (magnitudes
  drawn until the SNR lands in range); reported: median relative bias and NMAD of the
  posterior-median r flux.

Writes ``<out>/report.md`` and ``<out>/rows.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from _resumable import load_rows

import probdeblend as pb
from probdeblend.atomic import write_text
from probdeblend.scene_posterior import ScenePosterior
from probdeblend.simulate import BlendConfig, Frame, blend_scene

#: ``amortized``: q + closed-form photometry; ``amortized_q``: q's own log-normal fluxes;
#: ``laplace``: MAP + Laplace + PSIS; ``fit``: the user's default, ``probdeblend.fit(scene)``
#: (the ``auto`` ladder, ArviZ result), end to end.
METHODS = ("amortized", "amortized_q", "laplace", "fit")


def nmad(x):
    x = np.asarray(x, float)
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def noise_scene(seed: int, size: int = 48):
    survey = pb.get_survey("lsst")
    rng = np.random.default_rng(seed)
    var = np.array([b.sky_level for b in survey])
    img = rng.standard_normal((len(var), size, size)) * np.sqrt(var)[:, None, None]
    psf = np.stack([b.psf_image(25) for b in survey])
    c = (size - 1) / 2
    scene = pb.Scene(img, np.broadcast_to(var[:, None, None], img.shape).copy(), psf,
                     survey.band_names, survey.pixel_scale, positions=[[c, c]])
    r = list(survey.band_names).index("r")
    n_ap = np.pi * (1.0 / survey.pixel_scale) ** 2  # 2" diameter aperture
    return scene, float(np.sqrt(n_ap * var[r]))


def faint_scene(seed: int):
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=48), n_galaxies=(1, 1),
                      max_shift=0.2)
    pop = pb.simulate.GalaxyPopulation(mag_range=(24.5, 27.0))
    for k in range(50):
        sim = blend_scene(cfg, population=pop, seed=seed * 100 + k)
        if 5 <= sim.truth["snr"][0] <= 10:
            return sim
    return None


def run(args):
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = pb.load_prior(args.prior)
    r = list(prior.bands).index("r")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    old = out / "rows.jsonl"
    # rows of the methods not rerun are kept (e.g. a slow laplace run)
    rows = [r for r in load_rows(old) if r["method"] not in methods]

    def engines_of(post, i):
        eng = {"amortized": post.amortized,
               "amortized_q": lambda n, seed: post.amortized(n, seed, photometry=False),
               "laplace": post.laplace,
               "fit": lambda n, seed: pb.fit(post.scene, prior, num_samples=n, seed=seed,
                                             n_predictive=0)}
        return [(m, eng[m]) for m in methods if m != "laplace" or i < args.n_laplace]

    def path_of(d) -> str:
        """What ran: fit's ``attrs["method"]`` (the ladder's path) or the engine's method."""
        return str(d.attrs.get("method", "")) if hasattr(d, "attrs") else str(d.method)

    def r_flux(post, d):
        """r-flux draws of the target from Draws or from fit's InferenceData."""
        if hasattr(d, "posterior"):
            return d.posterior["flux"].sel(band="r").values[..., 0].ravel()
        return post.measure(d)["flux"][0, :, 0, r]

    for i in range(args.n_noise):
        scene, sig_ap = noise_scene(40_000_000 + i)
        post = ScenePosterior(scene, prior)
        engines = engines_of(post, i)
        for name, eng in engines:
            t0 = time.perf_counter()
            d = eng(200, seed=i)
            f = r_flux(post, d)
            lo, hi = np.percentile(f, [2.5, 97.5])
            rows.append({"case": "noise", "method": name, "lo95": float(lo), "hi95": float(hi),
                         "median": float(np.median(f)), "sigma_ap": sig_ap,
                         "ok": bool(lo < sig_ap), "seconds": time.perf_counter() - t0,
                         "path": path_of(d)})
    for i in range(args.n_faint):
        sim = faint_scene(50_000_000 + i)
        if sim is None:
            continue
        post = ScenePosterior(sim.to_scene(), prior)
        tf = float(sim.truth["flux_r"][0])
        engines = engines_of(post, i)
        for name, eng in engines:
            d = eng(200, seed=i)
            f = r_flux(post, d)
            lo68, hi68 = np.percentile(f, [16, 84])
            rows.append({"case": "faint", "method": name, "rel": float(np.median(f) / tf - 1),
                         "snr": float(sim.truth["snr"][0]), "cov68": bool(lo68 <= tf <= hi68),
                         "path": path_of(d)})
    write_text("".join(json.dumps(row) + "\n" for row in rows), out / "rows.jsonl",
               overwrite=True)
    report(out, rows)


def report(out, rows):
    present = {r["method"] for r in rows}
    methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
    lines = ["# Posteriors at the edges", "",
             "`laplace_uncond`, `fit_uncond`: the same methods with the shipped prior before its "
             "flow got the magnitude-conditioned map (`benchmarks/fit_size_prior.py`, "
             "docs/priors.md); kept for comparison.", "",
             "Pure-noise position (48x48 LSST sky noise, position at the centre): the 95% "
             "interval of the r flux; target: lower edge below 1 sigma of the sky noise in a "
             "2\" aperture.", "",
             "| method | n | median r flux (e-) | 95% lower edge (median) | 1 sigma aperture | "
             "lower edge < 1 sigma |", "|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["case"] == "noise" and r["method"] == m]
        if rs:
            lines.append(f"| {m} | {len(rs)} | {np.median([r['median'] for r in rs]):.0f} | "
                         f"{np.median([r['lo95'] for r in rs]):.0f} | "
                         f"{rs[0]['sigma_ap']:.0f} | {np.mean([r['ok'] for r in rs]):.2f} |")
    lines += ["", "Faint isolated galaxies (r SNR 5-10): posterior-median r flux; target: "
                  "median bias < 5%.", "",
              "| method | n | median bias | NMAD | 68% coverage |", "|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["case"] == "faint" and r["method"] == m]
        if rs:
            rel = [r["rel"] for r in rs]
            lines.append(f"| {m} | {len(rs)} | {np.median(rel):+.3f} | {nmad(rel):.3f} | "
                         f"{np.mean([r['cov68'] for r in rs]):.2f} |")
    faint = {}
    for r in rows:
        if r["case"] == "faint":
            faint.setdefault(r["method"], {})[round(r["snr"], 6)] = r
    if "laplace" in faint and "laplace_uncond" in faint:
        same = sorted(set(faint["laplace"]) & set(faint["laplace_uncond"]))
        if same:
            lines += ["", f"laplace on the same {len(same)} faint galaxies: median bias "
                      + ", ".join(f"{m} {np.median([faint[m][k]['rel'] for k in same]):+.3f} "
                                  f"(68% coverage "
                                  f"{np.mean([faint[m][k]['cov68'] for k in same]):.2f})"
                                  for m in ("laplace_uncond", "laplace")) + "."]
    paths = sorted({r.get("path", "") for r in rows if r["method"] == "fit"})
    if paths:
        lines += ["", "`fit` (the default `probdeblend.fit(scene)`) took: " + "; ".join(
            f"{p} ({sum(r.get('path') == p for r in rows if r['method'] == 'fit')})"
            for p in paths) + "."]
    write_text("\n".join(lines) + "\n", Path(out) / "report.md", overwrite=True)
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-noise", type=int, default=40)
    ap.add_argument("--n-faint", type=int, default=200)
    ap.add_argument("--n-laplace", type=int, default=30)
    ap.add_argument("--methods", default="amortized,amortized_q,laplace,fit",
                    help=f"comma-separated subset of {METHODS}; rows of the others are kept")
    ap.add_argument("--prior", default="lsst-vae")
    ap.add_argument("--out", default="benchmarks/results/edges")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild report.md from rows.jsonl without running anything")
    args = ap.parse_args(argv)
    if args.report_only:
        report(args.out, load_rows(Path(args.out) / "rows.jsonl"))
        return
    run(args)


if __name__ == "__main__":
    main()
