"""NUTS as the reference: wall time and effective sample size on two-galaxy scenes.

    python benchmarks/nuts_reference.py --n 3 --num-samples 500 --chains 4 --warmup 300
    python benchmarks/nuts_reference.py --n 1 --num-samples 150 --chains 4 --warmup 100 \
        --chain-method sequential

For each scene (80x80 LSST ugrizy, two galaxies 0.5-3" apart, the benchmark's family (a)
settings otherwise): the whole user path of ``ScenePosterior(...).nuts()`` (MAP, Laplace mass
matrix, NUTS, shape of every draw), then the bulk ESS (ArviZ) of every source's r flux, e1 and
e2, and the r-flux error of the posterior median against the truth. The issue's target: >= 400
ESS of every flux and e in < 60 s. Rows go to ``<out>/rows.jsonl`` (resumable), the table to
``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import arviz as az
import numpy as np
from _resumable import load_rows

import probdeblend as pb
from probdeblend.atomic import write_text
from probdeblend.scene_posterior import NutsConfig, ScenePosterior
from probdeblend.simulate import BlendConfig, Frame, blend_scene


def scene_of(i: int):
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=80), n_galaxies=(2, 2),
                      max_shift=0.2, annulus=(0.5, 3.0), psf_fwhm_range=(0.9, 1.2))
    return blend_scene(cfg, seed=30_000_000 + i)


def config_of(args) -> str:
    """The NUTS settings of a row, e.g. ``4x(100+150) sequential``."""
    acc = "" if args.target_accept == 0.8 else f" accept {args.target_accept:g}"
    return f"{args.chains}x({args.warmup}+{args.num_samples}) {args.chain_method}{acc}"


def run_one(i, prior, args) -> dict:
    sim = scene_of(i)
    r = list(prior.bands).index("r")
    t0 = time.perf_counter()
    post = ScenePosterior(sim.to_scene(), prior)
    cfg = NutsConfig(num_warmup=args.warmup, num_chains=args.chains,
                     chain_method=args.chain_method, target_accept=args.target_accept)
    d = post.nuts(args.num_samples, seed=i, config=cfg)
    t_nuts = time.perf_counter() - t0
    v = post.measure(d)
    t_all = time.perf_counter() - t0
    ess = {}
    for name, arr in (("flux_r", v["flux"][..., r]), ("e1", v["e1"]), ("e2", v["e2"])):
        for s in range(arr.shape[-1]):
            ess[f"{name}[{s}]"] = float(az.ess(np.asarray(arr[..., s], float), method="bulk"))
    f = np.median(v["flux"][..., 0, r])
    return {"scene": i, "config": config_of(args), "seconds_nuts": t_nuts,
            "seconds_total": t_all, "seconds_sampling": float(d.timings["nuts_s"]),
            "seconds_compile": float(d.timings.get("nuts_compile_s", np.nan)),
            "seconds_map_laplace": float(d.timings.get("map_laplace_s", np.nan)),
            "min_ess": min(ess.values()), "ess": ess,
            "flux_rel": float(f / float(sim.truth[0]["flux_r"]) - 1),
            "draws": int(args.num_samples * args.chains),
            "mean_leapfrog": float(d.info.get("mean_leapfrog_steps", np.nan)),
            "divergences": int(np.sum(d.sample_stats.get("diverging", 0)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--chain-method", default="auto",
                    choices=("auto", "threaded", "sequential", "vectorized"))
    ap.add_argument("--target-accept", type=float, default=0.8,
                    help="NUTS target acceptance probability of the step-size adaptation")
    ap.add_argument("--prior", default="lsst-vae")
    ap.add_argument("--out", default="benchmarks/results/nuts")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.jsonl"
    rows = load_rows(path)
    done = {(r["scene"], r.get("config")) for r in rows}
    prior = pb.load_prior(a.prior)
    for i in range(a.n):
        if (i, config_of(a)) in done:
            continue
        rows.append(run_one(i, prior, a))
        write_text("".join(json.dumps(r) + "\n" for r in rows), path, overwrite=True)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ess"}), flush=True)
    lines = ["# NUTS reference (2-galaxy scenes)", "",
             "NumPyro NUTS from the MAP with the Laplace mass matrix (step size adapted in the "
             "warm-up), chains x (warm-up + draws) per row; 2 shared CPU cores, one process "
             "per command (the first scene of a process pays the MAP's and the NUTS loop's "
             "compilation). Target: >= 400 ESS of every flux and e in < 60 s.", "",
             "| scene | config | MAP + Laplace s | NUTS compile s | NUTS sampling s | "
             "total s (with shapes) | min ESS (flux_r, e1, e2) | leapfrog / draw | "
             "r-flux error | divergences |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        v = r.get(k)
        return "-" if v is None or not np.isfinite(v) else f"{v:.0f}"

    for r in rows:
        lines.append(f"| {r['scene']} | {r.get('config', '4x(100+150) vectorized')} | "
                     f"{cell(r, 'seconds_map_laplace')} | {cell(r, 'seconds_compile')} | "
                     f"{cell(r, 'seconds_sampling')} | {r['seconds_total']:.0f} | "
                     f"{r['min_ess']:.0f} | {cell(r, 'mean_leapfrog')} | {r['flux_rel']:+.3f} | "
                     f"{r['divergences']} |")
    write_text("\n".join(lines) + "\n", out / "report.md", overwrite=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
