"""Command line: ``probdeblend demo | simulate | train-prior | fit | deblend``.

Run ``probdeblend <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .fit import METHODS

__all__ = ["main", "build_parser", "EXIT_USAGE"]

#: Exit status for user errors (bad arguments, missing or corrupt inputs, existing outputs),
#: the same as argparse's usage errors.
EXIT_USAGE = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every option's default; descriptions keep their line breaks."""

    def _get_help_string(self, action):
        if action.required:  # a required option has no default to show
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults, used for the main parser and every subcommand.

    Each subcommand also accepts ``--debug`` (full tracebacks), so it may be given before or
    after the subcommand name.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        is_sub = kwargs.pop("_subcommand", True)
        super().__init__(*args, **kwargs)
        if is_sub:
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help="show the full traceback of errors")


def _int_arg(minimum: int | None = None):
    """argparse ``type=`` for an integer ``>= minimum`` (one-line usage error otherwise)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    convert.__name__ = "int"
    return convert


def _float_arg(minimum: float | None = None, exclusive: bool = False,
               maximum: float | None = None):
    """argparse ``type=`` for a finite float in range."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if exclusive else '>='} {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {value:g}")
        return value

    convert.__name__ = "float"
    return convert


_SEED = _int_arg(0)
_POSITIVE = _int_arg(1)


def _cmd_demo(args) -> int:
    """Simulate an LSST blend, deblend it, print the posterior summary next to the truth."""
    import numpy as np

    from . import diagnostics
    from .atomic import atomic_path, check_writable
    from .fit import fit
    from .plotting import plot_blend
    from .scene_posterior import NutsConfig
    from .simulate import BlendConfig, Frame, blend_scene

    # outputs are checked before any work starts
    out = check_writable(args.out, args.overwrite, "--out")
    corner = out.with_name(out.stem + "-corner" + out.suffix)
    if not args.simulate_only:
        check_writable(corner, args.overwrite, "--out (corner plot)")
    cfg = BlendConfig(frame=Frame(survey=args.survey, stamp_size=args.size),
                      n_galaxies=(args.n_galaxies, args.n_galaxies))
    sim = blend_scene(cfg, seed=args.seed)
    scene = sim.to_scene(with_positions=not args.detect)
    print(scene)
    if args.simulate_only:
        with atomic_path(out, args.overwrite, argument="--out") as tmp:
            plot_blend(sim, path=tmp)
        print(f"figure written to {out}")
        return 0
    t0 = time.perf_counter()
    idata = fit(scene, prior=args.prior, method=args.method, num_samples=args.num_samples,
                seed=args.seed, nuts=NutsConfig(num_warmup=args.num_warmup,
                                                num_chains=args.num_chains),
                progress=False, check=False)
    dt = time.perf_counter() - t0
    table = diagnostics.summary_table(idata)
    truth = sim.truth
    print(f"\nposterior summary ({idata.attrs['method']}, {dt:.1f} s; path: "
          f"{idata.attrs.get('path', idata.attrs['method'])}):")
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
    model = idata.deblended["image"].sum("source").values
    with atomic_path(out, args.overwrite, argument="--out") as tmp:
        diagnostics.plot_scene(scene, model, path=tmp,
                               positions=np.stack([table["x"], table["y"]], -1))
    with atomic_path(corner, args.overwrite, argument="--out") as tmp:
        diagnostics.plot_corner(idata, source=0, truth=truth[0], path=tmp)
    print(f"figures written to {out} and {corner}")
    return 0


_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")


def _fit_outputs(args) -> dict:
    """Check the ``fit`` inputs and output paths before any work starts.

    Returns ``{"posterior": Path, "summary": Path, "plot": Path or None}``.
    """
    from .atomic import check_writable
    from .errors import ArgumentError
    from .validate import check_distinct_paths, check_input_path

    check_input_path("scene", args.scene)
    out = Path(args.out).expanduser()
    if out.suffix.lower() not in _NETCDF_SUFFIXES:
        raise ArgumentError(
            "--out", args.out,
            f"the posterior is written as NetCDF: give a path ending in .nc (e.g. "
            f"{out.with_suffix('.nc')}); the summary table goes to --summary "
            f"(default <out>.ecsv)",
        )
    summary = Path(args.summary).expanduser() if args.summary else out.with_suffix(".ecsv")
    plot = Path(args.plot).expanduser() if args.plot else None
    check_distinct_paths({"scene": args.scene, "--out": out, "--summary": summary,
                          "--plot": plot})
    check_writable(out, args.overwrite, "--out")
    check_writable(summary, args.overwrite, "--summary")
    if plot is not None:
        check_writable(plot, args.overwrite, "--plot")
    return {"posterior": out, "summary": summary, "plot": plot}


def _cmd_fit(args) -> int:
    """Deblend a scene stored as FITS (Scene.to_fits layout) and save the InferenceData."""
    from . import diagnostics
    from .atomic import atomic_path, write_netcdf, write_table
    from .fit import fit
    from .scene import Scene
    from .scene_posterior import PRIORS, NutsConfig

    paths = _fit_outputs(args)
    scene = Scene.from_fits(args.scene)
    prior = PRIORS.prior(args.prior)  # a bad prior name fails here, before any sampling
    idata = fit(scene, prior=prior, method=args.method, num_samples=args.num_samples,
                seed=args.seed, nuts=NutsConfig(num_chains=args.num_chains,
                                                max_seconds=args.nuts_budget),
                exact=args.exact, progress=True)
    write_netcdf(idata, paths["posterior"], overwrite=args.overwrite)
    table = diagnostics.summary_table(idata)
    write_table(table, paths["summary"], overwrite=args.overwrite, format="ascii.ecsv")
    table.pprint(max_width=200)
    print(f"posterior written to {paths['posterior']}; summary to {paths['summary']}")
    if paths["plot"] is not None:
        with atomic_path(paths["plot"], args.overwrite, argument="--plot") as tmp:
            diagnostics.plot_scene(scene, idata.constant_data["model_mean"].values, path=tmp)
        print(f"figure written to {paths['plot']}")
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
    from .atomic import check_writable
    from .dataset import load_dataset
    from .errors import ArgumentError
    from .priors.frame import ModelFrame
    from .priors.train import TrainConfig, build_prior
    from .validate import check_input_path

    check_input_path("data", args.data, directory=True)
    stem = Path(args.out).expanduser()
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    for suffix in (".json", ".safetensors"):  # checked before training starts
        check_writable(Path(str(stem) + suffix), args.overwrite, "--out")
    arrays, _, meta = load_dataset(args.data, keys=("noiseless",), truth=False)
    images = arrays["noiseless"]
    if args.limit:
        images = images[: args.limit]
    fr = meta["frame"]
    if fr.get("psf_fwhm") is None:
        raise ArgumentError("data", str(args.data),
                            f"{args.data} was simulated with survey PSFs; priors are trained in "
                            f"a model frame: simulate with --psf-fwhm (e.g. 0.4)")
    frame = ModelFrame(bands=tuple(fr["bands"]), pixel_scale=fr["pixel_scale"],
                       stamp_size=fr["stamp_size"], psf_fwhm=fr["psf_fwhm"],
                       survey=fr["survey"].upper())
    cfg = TrainConfig(kind=args.kind, latent_dim=args.latent_dim, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      num_threads=args.threads)
    out = stem
    data = {"dataset": str(args.data), "dataset_meta": meta, "n_images": int(len(images)),
            "command": "probdeblend " + " ".join(sys.argv[1:])}
    workdir = args.workdir or f"runs/{out.name}-checkpoint"
    card = build_prior(images, frame, out.parent, out.name, cfg, data=data,
                       resume=args.resume, checkpoint_dir=workdir)
    print(f"saved prior card {card}")
    return 0


def _cmd_deblend(args) -> int:
    """Deblend survey tiles into one catalogue per tile (Dask; see docs/survey_scale.md)."""
    from .tiles import deblend_tiles
    from .validate import check_input_path

    for tile in args.tiles:
        check_input_path("tiles", tile)
    client = "serial" if args.serial else None
    summary = deblend_tiles(
        args.tiles, args.out, client=client, scheduler=args.scheduler, n_workers=args.workers,
        threads_per_worker=args.threads, seed=args.seed, format=args.format,
        retries=args.retries, overwrite=args.overwrite, progress=True, method=args.method,
        prior=args.prior, num_samples=args.num_samples,
    )  # fmt: skip
    summary["tile", "status", "attempts", "n_sources", "seconds", "error"].pprint(
        max_width=200, max_lines=-1)
    failed = int((summary["status"] == "failed").sum()) if len(summary) else 0
    print(f"{len(summary)} tiles in {summary.meta['WALL']:.1f} s: catalogues and run.json in "
          f"{args.out}" + (f"; {failed} failed (see the error column)" if failed else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``probdeblend`` argument parser (every subcommand's ``--help`` shows defaults)."""
    from . import __version__

    p = _Parser(prog="probdeblend", description=__doc__.splitlines()[0], _subcommand=False,
                epilog="User errors (bad arguments, missing or corrupt inputs, existing "
                       "outputs) print one line 'probdeblend: error: ...' and exit with status "
                       "2; add --debug for the full traceback.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="COMMAND", help="run `probdeblend COMMAND --help`")

    d = sub.add_parser("demo", help="simulate a blended LSST scene, deblend it, compare with "
                                     "the truth, save figures")
    d.add_argument("--survey", default="lsst", help="survey to simulate (lsst, hsc, euclid)")
    d.add_argument("--size", type=_int_arg(16), default=80, help="scene size in pixels")
    d.add_argument("--n-galaxies", type=_POSITIVE, default=2, help="galaxies in the blend")
    d.add_argument("--seed", type=_SEED, default=1, help="random seed (>= 0)")
    d.add_argument("--out", default="probdeblend-demo.png",
                   help="figure path; the corner plot goes next to it as <stem>-corner<ext>")
    d.add_argument("--overwrite", action="store_true", help="replace existing figures")
    d.add_argument("--prior", default="lsst-vae", help="shipped prior name or prior card path")
    d.add_argument("--method", default="auto", choices=list(METHODS),
                   help="inference engine")
    d.add_argument("--num-samples", type=_POSITIVE, default=300,
                   help="posterior draws (per chain with --method nuts)")
    d.add_argument("--num-chains", type=_POSITIVE, default=2, help="MCMC chains")
    d.add_argument("--num-warmup", type=_POSITIVE, default=150, help="NUTS warm-up steps")
    d.add_argument("--detect", action="store_true", help="detect sources instead of using truth")
    d.add_argument("--simulate-only", action="store_true", help="only simulate and plot")
    d.set_defaults(func=_cmd_demo)

    f = sub.add_parser("fit", help="deblend a scene FITS file (Scene.to_fits layout)")
    f.add_argument("scene", help="FITS file written by probdeblend.Scene.to_fits")
    f.add_argument("--out", required=True,
                   help="posterior InferenceData output, NetCDF (.nc)")
    f.add_argument("--summary", default=None,
                   help="summary table output (ECSV); None: --out with suffix .ecsv")
    f.add_argument("--plot", default=None, help="scene / model / residual figure (PNG)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (otherwise they are refused before "
                        "any work starts)")
    f.add_argument("--prior", default="lsst-vae", help="shipped prior name or prior card path")
    f.add_argument("--method", default="auto", choices=list(METHODS),
                   help="inference engine; auto = the ladder amortized -> laplace -> nuts "
                        "(docs/inference.md)")
    f.add_argument("--exact", action="store_true",
                   help="auto starts at laplace (MAP + Laplace + PSIS) instead of q")
    f.add_argument("--num-samples", type=_POSITIVE, default=1000,
                   help="posterior draws (per chain with --method nuts; the auto ladder's "
                        "NUTS rung splits them over the chains)")
    f.add_argument("--num-chains", type=_POSITIVE, default=4, help="MCMC chains")
    f.add_argument("--nuts-budget", type=_float_arg(0.0, exclusive=True), default=None,
                   metavar="SECONDS",
                   help="NUTS sampling-time budget; over it NUTS stops (--method nuts: an "
                        "error; auto: the laplace draws are kept). Default: none for "
                        "--method nuts, 120 s on the auto ladder")
    f.add_argument("--seed", type=_SEED, default=0, help="random seed (>= 0)")
    f.set_defaults(func=_cmd_fit)

    s = sub.add_parser("simulate", help="write a sharded dataset of isolated stamps or blends")
    s.add_argument("out", help="output directory")
    s.add_argument("--kind", choices=["isolated", "blend"], default="isolated",
                   help="isolated stamps (prior training) or blended scenes")
    s.add_argument("-n", type=_POSITIVE, default=1000, help="number of stamps / scenes")
    s.add_argument("--survey", default="lsst", help="survey (lsst, hsc, euclid)")
    s.add_argument("--bands", nargs="*", default=None,
                   help="band names; default: all bands of the survey")
    s.add_argument("--size", type=_int_arg(4), default=None,
                   help="stamp size in pixels (None: 48 isolated, 80 blend)")
    s.add_argument("--psf-fwhm", type=_float_arg(0.0, exclusive=True), default=None,
                   help="one Gaussian PSF of this FWHM (arcsec) in all bands (model frame); "
                        "None: the survey's per-band PSFs")
    s.add_argument("--psf-size", type=_int_arg(3), default=41,
                   help="odd size of stored PSF images")
    s.add_argument("--max-offset", type=_float_arg(0.0), default=0.0,
                   help="isolated: largest random centroid offset, pixels")
    s.add_argument("--min-galaxies", type=_POSITIVE, default=2, help="blend: fewest galaxies")
    s.add_argument("--max-galaxies", type=_POSITIVE, default=4, help="blend: most galaxies")
    s.add_argument("--g1", type=_float_arg(-1.0, maximum=1.0), default=0.0,
                   help="blend: constant reduced shear g1")
    s.add_argument("--g2", type=_float_arg(-1.0, maximum=1.0), default=0.0,
                   help="blend: constant reduced shear g2")
    s.add_argument("--psf-scale-min", type=_float_arg(0.0, exclusive=True), default=1.0,
                   help="blend: smallest random PSF FWHM scale factor")
    s.add_argument("--psf-scale-max", type=_float_arg(0.0, exclusive=True), default=1.0,
                   help="blend: largest random PSF FWHM scale factor")
    s.add_argument("--noiseless-only", action="store_true",
                   help="store only the noiseless images (no noise realisation)")
    s.add_argument("--shard-size", type=_POSITIVE, default=1000, help="items per shard file")
    s.add_argument("--processes", type=_POSITIVE, default=1, help="worker processes")
    s.add_argument("--seed", type=_SEED, default=0, help="dataset seed (>= 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    s.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("train-prior", help="train a VAE / VAE-GAN prior on an isolated dataset")
    t.add_argument("data", help="dataset directory written by `probdeblend simulate`")
    t.add_argument("--out", required=True,
                   help="output stem, e.g. priors/lsst-vae (writes <stem>.json and "
                        "<stem>.safetensors)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing prior with this stem")
    t.add_argument("--kind", choices=["vae", "vaegan"], default="vae", help="prior model")
    t.add_argument("--latent-dim", type=_POSITIVE, default=32, help="latent dimension")
    t.add_argument("--epochs", type=_POSITIVE, default=20, help="training epochs")
    t.add_argument("--batch-size", type=_POSITIVE, default=64, help="minibatch size")
    t.add_argument("--lr", type=_float_arg(0.0, exclusive=True), default=1e-3,
                   help="learning rate")
    t.add_argument("--seed", type=_SEED, default=0, help="random seed (>= 0)")
    t.add_argument("--threads", type=_POSITIVE, default=2, help="torch CPU threads")
    t.add_argument("--limit", type=_int_arg(0), default=0,
                   help="use only the first N images (0: all)")
    t.add_argument("--workdir", default=None,
                   help="checkpoint directory (None: runs/<name>-checkpoint)")
    t.add_argument("--resume", action="store_true",
                   help="resume from the checkpoint in --workdir")
    t.set_defaults(func=_cmd_train_prior)

    db = sub.add_parser("deblend", help="deblend survey tiles (Scene FITS files) into "
                                         "catalogues, in parallel with Dask")
    db.add_argument("tiles", nargs="+", help="tile FITS files (probdeblend.Scene.to_fits layout)")
    db.add_argument("--out", required=True,
                    help="output folder: <tile>.cat.fits / .cat.parquet and run.json")
    db.add_argument("--scheduler", default=None,
                    help="address of a running Dask scheduler (tcp://host:8786); None: a "
                         "LocalCluster on this machine")
    db.add_argument("--workers", type=_POSITIVE, default=2, help="LocalCluster worker processes")
    db.add_argument("--threads", type=_POSITIVE, default=1, help="threads per worker / task")
    db.add_argument("--serial", action="store_true", help="run in this process, without Dask")
    db.add_argument("--method", default="amortized", choices=["amortized", "fit"],
                    help="amortized posteriors, or probdeblend.fit per blend group")
    db.add_argument("--prior", default="lsst-vae", help="shipped prior name or prior card path")
    db.add_argument("--num-samples", type=_POSITIVE, default=200, help="draws per source")
    db.add_argument("--format", default="fits", choices=["fits", "parquet"],
                    help="catalogue file format")
    db.add_argument("--retries", type=_int_arg(0), default=1,
                    help="resubmissions of a failed tile")
    db.add_argument("--seed", type=_SEED, default=0, help="run seed (>= 0); tiles get "
                                                          "seeds derived from it and their name")
    db.add_argument("--overwrite", action="store_true",
                    help="recompute tiles whose catalogue exists (default: skip them)")
    db.set_defaults(func=_cmd_deblend)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    """Run the command line; return the exit status.

    User errors (:class:`~probdeblend.errors.ProbdeblendError`, missing files and other
    ``OSError``) print one line ``probdeblend: error: ...`` on stderr and return
    :data:`EXIT_USAGE` (2); with ``--debug`` they propagate with their full traceback. Argument
    syntax errors exit with status 2 through argparse.
    """
    from .errors import ProbdeblendError

    args = build_parser().parse_args(argv)
    if args.command == "simulate" and args.size is None:
        args.size = 48 if getattr(args, "kind", "isolated") == "isolated" else 80
    try:
        return int(args.func(args) or 0)
    except (ProbdeblendError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"probdeblend: error: {_one_line(exc)}", file=sys.stderr)
        if not isinstance(exc, ProbdeblendError):
            print("probdeblend: (add --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("probdeblend: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
