"""Command line: ``probdeblend demo | simulate | train-prior``.

Run ``probdeblend <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cmd_demo(args) -> int:
    from .plotting import plot_blend
    from .simulate import BlendConfig, Frame, blend_scene

    cfg = BlendConfig(frame=Frame(survey=args.survey, stamp_size=args.size),
                      n_galaxies=(args.n_galaxies, args.n_galaxies))
    sim = blend_scene(cfg, seed=args.seed)
    scene = sim.to_scene()
    print(scene)
    cols = ["x", "y", "mag", "z", "hlr", "g1", "g2", "snr", "blendedness_total",
            "blendedness_closest"]
    sim.truth[cols].pprint(max_width=200)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_blend(sim, path=out)
    print(f"figure written to {out}")
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

    d = sub.add_parser("demo", help="simulate a blended LSST scene, show its truth, save a figure")
    d.add_argument("--survey", default="lsst")
    d.add_argument("--size", type=int, default=80, help="scene size in pixels")
    d.add_argument("--n-galaxies", type=int, default=3)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", default="probdeblend-demo.png")
    d.set_defaults(func=_cmd_demo)

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
    if getattr(args, "size", 0) is None:
        args.size = 48 if getattr(args, "kind", "isolated") == "isolated" else 80
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
