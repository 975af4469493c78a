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
import sys
import time
import warnings
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
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    prior = pb.load_prior(a.prior)
    kw = {"refine": a.refine} if a.refine else {}
    for i in range(a.warmup):
        pb.fit(scene_of("a", i)[0].to_scene(), prior=prior, method=a.method, num_samples=200,
               **kw)
    ts, ns = [], []
    for i in range(a.warmup, a.warmup + a.n):
        scene = scene_of("a", i)[0].to_scene()
        t0 = time.perf_counter()
        idata = pb.fit(scene, prior=prior, method=a.method, num_samples=200, **kw)
        ts.append(time.perf_counter() - t0)
        ns.append(idata.posterior.sizes["source"])
        print(f"scene {i}: {ns[-1]} sources, {ts[-1]:.2f} s, {idata.attrs['path']}",
              flush=True)
    print(f"fit(method={a.method!r}, 200 draws{', refine=' + str(a.refine) if a.refine else ''}): "
          f"median {np.median(ts):.2f} s/scene, mean {np.mean(ts):.2f}, max {np.max(ts):.2f}, "
          f"{sum(ns) / sum(ts):.2f} sources/s over {len(ts)} scenes")
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
