"""End-to-end time of the user path ``probdeblend.fit`` on the deblend benchmark's scenes.

    python benchmarks/fit_timing.py --method amortized --n 10
    python benchmarks/fit_timing.py --method amortized --refine 40 --n 20 --warmup 3

Times ``fit(scene, method=..., num_samples=200)`` (true positions given; the default result
with posterior predictive, log-likelihood of every draw and deblended images) on family (a)
scenes after ``--warmup`` warm-up fits (JIT; one compile per number of sources), and the two
stages of one scene separately: the
posterior (``ScenePosterior`` + draws) and ``to_inference_data``. Prints the figures.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deblend_benchmark import scene_of  # noqa: E402

import probdeblend as pb  # noqa: E402
from probdeblend.scene_posterior import ScenePosterior  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="amortized")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--prior", default="lsst-vae")
    ap.add_argument("--refine", type=int, default=0, help="fit(..., refine=K)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up scenes (0..warmup-1)")
    ap.add_argument("--out", default="benchmarks/results/fit_timing",
                    help="folder of report.md, to which each run appends its line")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    prior = pb.load_prior(a.prior)
    kw = {"refine": a.refine} if a.refine else {}
    for i in range(a.warmup):
        pb.fit(scene_of("a", i)[0].to_scene(), prior=prior, method=a.method, num_samples=200,
               **kw)
    ts, ns, paths = [], [], []
    for i in range(a.warmup, a.warmup + a.n):
        scene = scene_of("a", i)[0].to_scene()
        t0 = time.perf_counter()
        idata = pb.fit(scene, prior=prior, method=a.method, num_samples=200, **kw)
        ts.append(time.perf_counter() - t0)
        ns.append(idata.posterior.sizes["source"])
        rungs = re.findall(r"(?:^| -> )(\w+)", idata.attrs["path"])
        kept = "laplace draws kept" in idata.attrs["path"]  # the NUTS rung ran out of budget
        paths.append(" -> ".join(rungs) + (" (budget: laplace kept)" if kept else ""))
        print(f"scene {i}: {ns[-1]} sources, {ts[-1]:.2f} s, {idata.attrs['path']}",
              flush=True)
    line = (f"fit(method={a.method!r}, 200 draws{', refine=' + str(a.refine) if a.refine else ''}"
            f"): median {np.median(ts):.2f} s/scene, mean {np.mean(ts):.2f}, max "
            f"{np.max(ts):.2f}, {sum(ns) / sum(ts):.2f} sources/s over {len(ts)} scenes "
            f"(scenes {a.warmup}-{a.warmup + a.n - 1} of family (a), {time.strftime('%Y-%m-%d')})")
    print(line)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    if not report.exists():
        report.write_text("# End-to-end `fit` time (`benchmarks/fit_timing.py`)\n\n"
                          "One line per run, appended: 2 CPU cores unless said otherwise.\n\n")
    with report.open("a") as fh:
        fh.write(f"- `python benchmarks/fit_timing.py {' '.join(argv or sys.argv[1:])}`: "
                 f"{line}; paths: {dict(Counter(paths))}\n")
    scene = scene_of("a", 1)[0].to_scene()
    t0 = time.perf_counter()
    post = ScenePosterior(scene, prior)
    draws = post.amortized(200, 0, refine=a.refine) if a.method == "amortized" else None
    t1 = time.perf_counter()
    if draws is not None:
        post.to_inference_data(draws)
        print(f"scene 1 ({post.n_sources} sources): posterior {t1 - t0:.2f} s, "
              f"to_inference_data {time.perf_counter() - t1:.2f} s")


if __name__ == "__main__":
    main()
