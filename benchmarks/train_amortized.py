"""Train the amortized posterior of a prior on a blend dataset and ship it.

Example (the shipped LSST model; ~4 min of target precomputation, then ~1.5 min per epoch on
2 CPU cores)::

    python benchmarks/train_amortized.py --data data/lsst-blends-train --prior lsst-vae \\
        --epochs 10 --out priors/lsst-vae-amortized --threads 2

Steps: build the :class:`probdeblend.amortized.TrainingSet` (cutouts, noise levels, PSF FWHMs,
true log-fluxes and offsets, and the latent targets of the 8 dihedral transforms of each target,
rendered in the prior's model frame and encoded by the frozen prior; cached in the work
directory), train with checkpoints (``--resume`` continues an interrupted run exactly),
evaluate on the held-out scenes, measure the throughput, and write ``<out>.safetensors`` and
``<out>.json`` (model card with the recipe, the metrics and the sha256). Prints the metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", required=True, help="blend dataset (probdeblend simulate --kind blend)"
    )
    p.add_argument("--prior", required=True, help="prior name or path (e.g. lsst-vae)")
    p.add_argument(
        "--out", default=None, help="output stem (default priors/<prior-name>-amortized)"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--stamp-size", type=int, default=None, help="cutout size (default: the scenes' size)"
    )
    p.add_argument(
        "--z-target",
        choices=["model", "observed"],
        default="model",
        help="latent targets from the target re-rendered in the prior's model frame "
        "(default) or from the dataset's observed-PSF noiseless_target",
    )
    p.add_argument("--mask-prob", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="no dihedral augmentation")
    p.add_argument("--limit", type=int, default=0, help="use only the first N scenes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--workdir",
        default=None,
        help="checkpoints and cached targets (default runs/<out name>-checkpoint)",
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from probdeblend.amortized import (
        AmortizedTrainConfig,
        TrainingSet,
        build_amortized,
        load_amortized,
    )
    from probdeblend.priors.io import load_prior

    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    out = Path(args.out) if args.out else Path("priors") / f"{prior.name}-amortized"
    workdir = Path(args.workdir) if args.workdir else Path("runs") / f"{out.name}-checkpoint"
    progress = not args.no_progress
    t0 = time.perf_counter()
    data = TrainingSet.from_dataset(
        args.data,
        prior,
        stamp_size=args.stamp_size,
        z_target=args.z_target,
        limit=args.limit or None,
        progress=progress,
        cache_dir=workdir,
    )
    t_data = time.perf_counter() - t0
    print(
        f"training set: {len(data)} scenes {data.image.shape[1:]} in {t_data:.0f} s "
        f"(latent targets: {args.z_target} frame)"
    )
    cfg = AmortizedTrainConfig(
        channels=tuple(args.channels),
        hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        augment=not args.no_augment,
        mask_prob=args.mask_prob,
        num_threads=args.threads,
    )
    recipe = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "training_set_build_s": t_data,
    }
    card_path = build_amortized(
        data,
        prior,
        out,
        cfg,
        workdir=workdir,
        progress=progress,
        resume=args.resume,
        data_recipe=recipe,
    )
    post = load_amortized(card_path)  # verifies the checksum of what was written
    card = post.card
    v, perf = card["validation"], card["performance"]
    print(
        f"saved {card_path} ({card['file_size_bytes'] / 1e6:.1f} MB, sha256 {card['sha256'][:12]})"
    )
    print(f"validation on {v['n']} held-out scenes:")
    rows = [
        ("NLL per scene (nats)", v["nll"]),
        ("median |offset error| (px)", v["offset_error_median_px"]),
        (f"log-flux residual median ({v['metric_band']})", v["log_flux_residual_median"]),
        (f"log-flux residual NMAD ({v['metric_band']})", v["log_flux_residual_nmad"]),
        ("z residual RMS", v["z_residual_rms"]),
        ("z target RMS (no-information error)", v["z_true_rms"]),
        (f"68% coverage log-flux {v['metric_band']}", v["coverage68_log_flux"]),
        ("68% coverage offset x", v["coverage68_offset_x"]),
        ("68% coverage z (mean over dims)", v["coverage68_z_mean"]),
        ("throughput (sources/s, batch 256)", perf["sources_per_s"]),
    ]
    for name, val in rows:
        print(f"  {name:<42s} {val:10.4f}")
    nmad = v["log_flux_residual_nmad_per_band"]
    print("  log-flux NMAD per band: " + ", ".join(f"{b} {x:.3f}" for b, x in nmad.items()))
    print("  68% coverage per z dim: " + " ".join(f"{c:.2f}" for c in v["coverage68_z"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
