"""Shear of an ensemble of blended scenes: hierarchical and full-forward-model posteriors.

Simulates blended LSST scenes whose galaxies all carry the same lensing shear, each with its
90-degree rotated, same-noise twin (which cancels intrinsic shape noise), deblends them with the
amortized posterior, and infers the shared shear (g1, g2) two ways:

1. ``shear.infer``: hierarchical, from every target's ellipticity posterior draws
   (Schneider et al. 2015 importance sampling, interim prior from the learned prior);
2. ``shear.infer_forward``: the shear as a sample site of one joint model of all scenes, applied
   to every decoded intrinsic galaxy inside the renderer (Laplace approximation here; pass
   ``--forward-method nuts`` for NUTS).

Run::

    python examples/shear_ensemble.py --n 20 --g1 0.05          # ~2 min on 2 cores
    python examples/shear_ensemble.py --tiny                      # the test suite's smoke run

Both posteriors are printed with their means and standard deviations, and a figure of the two
posteriors is written to ``--out``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="base scenes (each with its rotated twin)")
    p.add_argument("--g1", type=float, default=0.05)
    p.add_argument("--g2", type=float, default=0.0)
    p.add_argument("--forward-scenes", type=int, default=6,
                   help="base scenes used by the (slower) forward-model posterior")
    p.add_argument("--forward-method", default="laplace", choices=["laplace", "nuts"])
    p.add_argument("--prior", default="lsst-vae")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="shear_ensemble.png")
    p.add_argument("--tiny", action="store_true", help="2 small scenes (smoke test)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)

    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import probdeblend as pb
    from probdeblend import shear
    from probdeblend.simulate import BlendConfig, Frame, blend_scene

    n, n_fwd = (2, 1) if args.tiny else (args.n, min(args.forward_scenes, args.n))
    size = 64 if args.tiny else 80
    cfg = BlendConfig(frame=Frame(survey="lsst", stamp_size=size),
                      n_galaxies=(2, 2) if args.tiny else (2, 3),
                      annulus=(0.8, 3.0), shear=(args.g1, args.g2))
    scenes = [blend_scene(cfg, seed=args.seed + i, rotate90=rot).to_scene()
              for i in range(n) for rot in (False, True)]
    prior = pb.load_prior(args.prior)

    t0 = time.perf_counter()
    fits = [pb.fit(s, prior=prior, method="amortized", num_samples=30 if args.tiny else 200,
                   seed=i, n_predictive=2) for i, s in enumerate(scenes)]
    # targets only (source 0 of each scene): neighbours are cut by the scene edge more often
    e = np.stack([np.stack([f.posterior["e1"].values[..., 0].ravel(),
                            f.posterior["e2"].values[..., 0].ravel()], -1) for f in fits])
    sigma_e = shear.interim_sigma(prior, n=200 if args.tiny else 4000)
    hier = shear.infer(e, sigma_e=sigma_e)
    t_hier = time.perf_counter() - t0

    t0 = time.perf_counter()
    fwd = shear.infer_forward(scenes[: 2 * n_fwd], prior=prior, method=args.forward_method,
                              num_warmup=50 if args.tiny else 150,
                              num_samples=50 if args.tiny else 300)
    t_fwd = time.perf_counter() - t0

    print(f"true shear (g1, g2) = ({args.g1:+.4f}, {args.g2:+.4f}); interim sigma_e = "
          f"{sigma_e:.3f}")
    for name, post, t, k in (("hierarchical", hier, t_hier, 2 * n),
                             (f"forward ({args.forward_method})", fwd, t_fwd, 2 * n_fwd)):
        a = post.attrs
        print(f"{name:>20}: g1 = {a['g1_mean']:+.4f} +- {a['g1_sd']:.4f}, g2 = "
              f"{a['g2_mean']:+.4f} +- {a['g2_sd']:.4f}  ({k} scenes, {t:.0f} s)")
    print(az.summary(hier, kind="stats"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, post, c in (("hierarchical", hier, "C0"), ("forward model", fwd, "C1")):
        g1 = post.posterior["g1"].values.ravel()
        g2 = post.posterior["g2"].values.ravel()
        ax.scatter(g1, g2, s=2, alpha=0.3, color=c, label=name)
    ax.plot(args.g1, args.g2, "k*", ms=14, label="truth")
    ax.set(xlabel="g1", ylabel="g2", title=f"shear posterior, {2 * n} blended scenes")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if out.suffix != ".png":
        out = out / "shear_ensemble.png"
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
