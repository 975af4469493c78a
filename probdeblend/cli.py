"""Command line: ``probdeblend demo | simulate | train-prior | fit``.

Run ``probdeblend <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cmd_demo(args) -> int:
    """Simulate an LSST blend, deblend it, print the posterior summary next to the truth."""
    import numpy as np

    from . import diagnostics
    from .fit import fit
    from .plotting import plot_blend
    from .simulate import BlendConfig, Frame, blend_scene

    cfg = BlendConfig(frame=Frame(survey=args.survey, stamp_size=args.size),
                      n_galaxies=(args.n_galaxies, args.n_galaxies))
    sim = blend_scene(cfg, seed=args.seed)
    scene = sim.to_scene(with_positions=not args.detect)
    print(scene)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.simulate_only:
        plot_blend(sim, path=out)
        print(f"figure written to {out}")
        return 0
    t0 = time.perf_counter()
    idata = fit(scene, prior=args.prior, method=args.method, num_samples=args.num_samples,
                seed=args.seed, num_chains=args.num_chains, num_warmup=args.num_warmup,
                progress=False, check=False)
    dt = time.perf_counter() - t0
    table = diagnostics.summary_table(idata, pareto_k=idata.attrs.get("pareto_k"))
    truth = sim.truth
    print(f"\nposterior summary ({idata.attrs['method']}, {dt:.1f} s):")
    cols = [c for c in ("id", "x", "y", "flux_r", "flux_r_err", "e1", "e1_err", "e2", "e2_err",
                        "r_hat", "ess_bulk", "pareto_k") if c in table.colnames]
    table[cols].pprint(max_width=200)
    print("\ntruth (target first; e1, e2 = true reduced shear g1, g2):")
    truth[["x", "y", "flux_r", "g1", "g2", "snr", "blendedness_total"]].pprint(max_width=200)
    diag = diagnostics.check_convergence(idata, warn=False)
    rhat = [v for v in diag["r_hat"].values() if v is not None and np.isfinite(v)]
    ess = [v for v in diag["ess_bulk"].values() if v is not None and np.isfinite(v)]
    print("\ndiagnostics: max R-hat " + (f"{max(rhat):.3f}" if rhat else "n/a (one chain)")
          + (f", min bulk ESS {min(ess):.0f}" if ess else "")
          + f", divergences {diag['n_divergent']}; Pareto k-hat per source "
          + str(np.round(idata.attrs.get("pareto_k", []), 2).tolist()))
    model = idata.constant_data["model_mean"].values
    diagnostics.plot_scene(scene, model, path=out,
                           positions=np.stack([table["x"], table["y"]], -1))
    corner = out.with_name(out.stem + "-corner" + out.suffix)
    diagnostics.plot_corner(idata, source=0, truth=truth[0], path=corner)
    print(f"figures written to {out} and {corner}")
    return 0


def _cmd_fit(args) -> int:
    """Deblend a scene stored as FITS (Scene.to_fits layout) and save the InferenceData."""
    from . import diagnostics
    from .fit import fit
    from .scene import Scene

    scene = Scene.from_fits(args.scene)
    idata = fit(scene, prior=args.prior, method=args.method, num_samples=args.num_samples,
                seed=args.seed, num_chains=args.num_chains, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(out))
    table = diagnostics.summary_table(idata, pareto_k=idata.attrs.get("pareto_k"))
    table.write(out.with_suffix(".ecsv"), overwrite=True)
    table.pprint(max_width=200)
    print(f"posterior written to {out}; summary to {out.with_suffix('.ecsv')}")
    if args.plot:
        diagnostics.plot_scene(scene, idata.constant_data["model_mean"].values, path=args.plot)
        print(f"figure written to {args.plot}")
    return 0


def _cmd_simulate(args) -> int:
    from .dataset import write_dataset
    from .simulate import BlendConfig, Frame

    frame = Frame(survey=args.survey, bands=tuple(args.bands) if args.bands else None,
                  stamp_size=args.size, psf_fwhm=args.psf_fwhm, psf_size=args.psf_size)
    blend = BlendConfig(frame=frame, n_galaxies=(args.min_galaxies, args.max_galaxies),
                        shear=(args.g1, args.g2),
                        psf_fwhm_range=(args.psf_scale_min, args.psf_scale_max))
    t0 = time.perf_counter()
    out = write_dataset(args.out, n=args.n, kind=args.kind, shard_size=args.shard_size,
                        seed=args.seed, processes=args.processes, frame=frame, blend=blend,
                        noise=not args.noiseless_only, max_offset=args.max_offset,
                        overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} {args.kind} items to {out} in {dt:.1f} s ({args.n / dt:.1f}/s)")
    return 0


def _cmd_train_prior(args) -> int:
    from .dataset import load_dataset
    from .priors.frame import ModelFrame
    from .priors.train import TrainConfig, build_prior

    arrays, _, meta = load_dataset(args.data, keys=("noiseless",), truth=False)
    images = arrays["noiseless"]
    if args.limit:
        images = images[: args.limit]
    fr = meta["frame"]
    if fr.get("psf_fwhm") is None:
        raise SystemExit(f"{args.data} was simulated with survey PSFs; priors are trained in a "
                         f"model frame: simulate with --psf-fwhm (e.g. 0.4)")
    frame = ModelFrame(bands=tuple(fr["bands"]), pixel_scale=fr["pixel_scale"],
                       stamp_size=fr["stamp_size"], psf_fwhm=fr["psf_fwhm"],
                       survey=fr["survey"].upper())
    cfg = TrainConfig(kind=args.kind, latent_dim=args.latent_dim, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      num_threads=args.threads)
    out = Path(args.out)
    data = {"dataset": str(args.data), "dataset_meta": meta, "n_images": int(len(images)),
            "command": "probdeblend " + " ".join(sys.argv[1:])}
    workdir = args.workdir or f"runs/{out.name}-checkpoint"
    card = build_prior(images, frame, out.parent, out.name, cfg, data=data,
                       resume=args.resume, checkpoint_dir=workdir)
    print(f"saved prior card {card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="probdeblend", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate a blended LSST scene, deblend it, compare with "
                                     "the truth, save figures")
    d.add_argument("--survey", default="lsst")
    d.add_argument("--size", type=int, default=80, help="scene size in pixels")
    d.add_argument("--n-galaxies", type=int, default=2)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", default="probdeblend-demo.png")
    d.add_argument("--prior", default="lsst-vae")
    d.add_argument("--method", default="auto", choices=["auto", "amortized", "svi", "nuts"])
    d.add_argument("--num-samples", type=int, default=300, help="draws per chain")
    d.add_argument("--num-chains", type=int, default=2)
    d.add_argument("--num-warmup", type=int, default=150)
    d.add_argument("--detect", action="store_true", help="detect sources instead of using truth")
    d.add_argument("--simulate-only", action="store_true", help="only simulate and plot")
    d.set_defaults(func=_cmd_demo)

    f = sub.add_parser("fit", help="deblend a scene FITS file (Scene.to_fits layout)")
    f.add_argument("scene", help="FITS file written by probdeblend.Scene.to_fits")
    f.add_argument("--out", required=True, help="InferenceData output (.nc)")
    f.add_argument("--prior", default="lsst-vae")
    f.add_argument("--method", default="auto", choices=["auto", "amortized", "svi", "nuts"])
    f.add_argument("--num-samples", type=int, default=1000)
    f.add_argument("--num-chains", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--plot", default=None, help="scene / model / residual figure (PNG)")
    f.set_defaults(func=_cmd_fit)

    s = sub.add_parser("simulate", help="write a sharded dataset of isolated stamps or blends")
    s.add_argument("out", help="output directory")
    s.add_argument("--kind", choices=["isolated", "blend"], default="isolated")
    s.add_argument("-n", type=int, default=1000, help="number of stamps / scenes")
    s.add_argument("--survey", default="lsst")
    s.add_argument("--bands", nargs="*", default=None)
    s.add_argument("--size", type=int, default=None,
                   help="stamp size in pixels (default 48 isolated, 80 blend)")
    s.add_argument("--psf-fwhm", type=float, default=None,
                   help="one Gaussian PSF of this FWHM (arcsec) in all bands (model frame); "
                        "default: the survey's per-band PSFs")
    s.add_argument("--psf-size", type=int, default=41, help="odd size of stored PSF images")
    s.add_argument("--max-offset", type=float, default=0.0, help="isolated: pixels")
    s.add_argument("--min-galaxies", type=int, default=2)
    s.add_argument("--max-galaxies", type=int, default=4)
    s.add_argument("--g1", type=float, default=0.0)
    s.add_argument("--g2", type=float, default=0.0)
    s.add_argument("--psf-scale-min", type=float, default=1.0)
    s.add_argument("--psf-scale-max", type=float, default=1.0)
    s.add_argument("--noiseless-only", action="store_true")
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("train-prior", help="train a VAE / VAE-GAN prior on an isolated dataset")
    t.add_argument("data", help="dataset directory written by `probdeblend simulate`")
    t.add_argument("--out", required=True, help="output stem, e.g. priors/lsst-vae")
    t.add_argument("--kind", choices=["vae", "vaegan"], default="vae")
    t.add_argument("--latent-dim", type=int, default=32)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--limit", type=int, default=0, help="use only the first N images")
    t.add_argument("--workdir", default=None,
                   help="checkpoint directory (default runs/<name>-checkpoint)")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=_cmd_train_prior)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate" and args.size is None:
        args.size = 48 if getattr(args, "kind", "isolated") == "isolated" else 80
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
