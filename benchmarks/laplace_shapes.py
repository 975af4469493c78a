"""How laplace should measure the ellipticity of its draws: decoded Laplace draws, linearised
shapes, against an exact posterior.

    python benchmarks/laplace_shapes.py --n 16

On *isolated* galaxies (48x48 LSST ugrizy, one galaxy of the project's population, S/N > 20)
the scene has only 24 dimensions, and Pareto-smoothed importance sampling with 6,000
Student-t proposals around the MAP is reliable (k-hat < 0.7): its resampled draws, decoded and
measured one by one, are the exact posterior of e1, e2. For each galaxy the benchmark compares
with it the posterior median and width (half the 16-84 % range) of e from

* ``decoded``: 1,000 plain Laplace (Gaussian) draws, each decoded and measured (what laplace
  returned for its unweighted draws before 0.4);
* ``linear``: the same draws, shapes to first order around the MAP
  (:meth:`probdeblend.ScenePosterior.linearised_shapes`, laplace's default for them now);
* ``map``: the MAP's own shape.

Rows go to ``<out>/rows.jsonl`` (resumable), the table and summary to ``<out>/report.md``.
Rows whose importance weights have k-hat >= 0.7 are listed but left out of the summary.
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
from probdeblend.inference import run_laplace
from probdeblend.scene_posterior import Draws, ScenePosterior
from probdeblend.simulate import BlendConfig, Frame, blend_scene

K_MAX = 0.7


def galaxy_of(i: int):
    """The i-th isolated galaxy (family (a)'s population and PSFs, 48x48)."""
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=48), n_galaxies=(1, 1),
                      max_shift=0.2, psf_fwhm_range=(0.9, 1.2))
    return blend_scene(cfg, seed=40_000_000 + i)


def _summary(e1, e2) -> list[float]:
    """[median e1, half 16-84 % range e1, median e2, half range e2] of finite draws."""
    out = []
    for e in (e1, e2):
        e = np.asarray(e, float).ravel()
        e = e[np.isfinite(e)]
        lo, hi = np.percentile(e, [16, 84])
        out += [float(np.median(e)), float(hi - lo) / 2]
    return out


def measure(i: int, prior, n_is: int, n_draws: int) -> dict | None:
    sim = galaxy_of(i)
    t = sim.truth[0]
    if t["snr"] < 20:
        return {"i": i, "skipped": f"S/N {float(t['snr']):.1f} < 20"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = ScenePosterior(sim.to_scene(), prior)
        x0 = np.asarray(post.map()[0], np.float64)
    t0 = time.perf_counter()
    exact = run_laplace(post.problem, x0, num_samples=n_draws, n_proposals=n_is, proposal="t",
                        pilot_fraction=1.0, compute_lp=False, seed=i, k_max=np.inf)
    gauss = run_laplace(post.problem, x0, num_samples=n_draws, n_proposals=100,
                        proposal="gaussian", pilot_fraction=1.0, compute_lp=False, seed=i,
                        k_max=-1.0)  # always the plain Laplace draws

    def decoded(flat):
        v = post.measure(Draws(np.asarray(flat)[None], "x"))
        return v["e1"][0, :, 0], v["e2"][0, :, 0]

    lin = post.linearised_shapes(x0, gauss.samples["flat"])
    return {"i": i, "snr": float(t["snr"]), "g": [float(t["g1"]), float(t["g2"])],
            "k_hat": float(exact.info["pareto_k"]), "ess": float(exact.info["ess"]),
            "exact": _summary(*decoded(exact.samples["flat"])),
            "decoded": _summary(*decoded(gauss.samples["flat"])),
            "linear": _summary(lin[0][:, 0], lin[1][:, 0]),
            "map": _summary(*decoded(x0[None]))[::2], "seconds": time.perf_counter() - t0}


def report(rows: list[dict], out: Path) -> None:
    good = [r for r in rows if "k_hat" in r and r["k_hat"] < K_MAX]
    lines = ["# laplace shapes: decoded Laplace draws vs linearised shapes vs exact (PSIS)", "",
             "Isolated galaxies of family (a)'s population (`benchmarks/laplace_shapes.py`). "
             "`exact`: PSIS-resampled draws from 6,000 Student-t proposals, decoded. Columns: "
             "posterior median and width (half the 16-84 % range) of e1, e2.", "",
             "| galaxy | S/N | true g1, g2 | k-hat | exact | decoded Laplace | linearised | MAP |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v):
        return " ".join(f"{x:+.3f}" for x in v)

    for r in rows:
        if "k_hat" not in r:
            continue
        lines.append(f"| {r['i']} | {r['snr']:.0f} | {f(r['g'])} | {r['k_hat']:.2f} | "
                     f"{f(r['exact'])} | {f(r['decoded'])} | {f(r['linear'])} | {f(r['map'])} |")
    lines += ["", f"Summary over the {len(good)} galaxies with k-hat < {K_MAX} "
              f"({sum('k_hat' in r for r in rows)} measured, "
              f"{sum('skipped' in r for r in rows)} skipped at S/N < 20):", "",
              "| shapes | median \\|median e - exact\\| | median e shift along the exact e "
              "(relative) | median width / exact width |", "|---|---|---|---|"]
    if good:
        ex = np.array([r["exact"] for r in good])
        for name in ("decoded", "linear", "map"):
            v = np.array([r[name] for r in good])
            med = v[:, [0, 2]] if name != "map" else v
            dev = np.median(np.abs(med - ex[:, [0, 2]]))
            ee = ex[:, [0, 2]]
            shift = np.median(np.sum((med - ee) * ee, 1) / np.sum(ee**2, 1))
            width = (np.median(v[:, [1, 3]] / ex[:, [1, 3]]) if name != "map" else np.nan)
            lines.append(f"| {name} | {dev:.4f} | {shift:+.3f} | {width:.2f} |")
    write_text("\n".join(lines) + "\n", out / "report.md", overwrite=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="galaxies 0..n-1")
    ap.add_argument("--n-is", type=int, default=6000, help="importance-sampling proposals")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/laplace_shapes")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.jsonl"
    rows = load_rows(path)
    if not args.report_only:
        done = {r["i"] for r in rows}
        prior = pb.load_prior("lsst-vae")
        from tqdm.auto import tqdm

        with path.open("a") as fh:
            for i in tqdm([i for i in range(args.n) if i not in done], desc="galaxies"):
                row = measure(i, prior, args.n_is, args.draws)
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    report(sorted(rows, key=lambda r: r["i"]), out)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
