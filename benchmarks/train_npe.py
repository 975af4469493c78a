"""Train the amortized encoder of a prior by neural posterior estimation (NPE).

Three steps, so that the heavy one runs on a GPU machine without GalSim:

    # 1. here (GalSim): PSF-bank difference kernels, sky, flux table -> a .npz bank
    python benchmarks/train_npe.py bank --prior lsst-vae --out .npe/bank-lsst-vae.npz
    # 2. anywhere with torch (GPU when there is one; resumable through --checkpoint)
    python benchmarks/train_npe.py train --prior lsst-vae --bank .npe/bank-lsst-vae.npz \
        --checkpoint .npe/ckpt.pt --steps 20000 --batch-size 512 --time-budget 3000
    # 3. here: save safetensors + model card (sha256), evaluated on held-out simulated scenes
    python benchmarks/train_npe.py save --prior lsst-vae --bank .npe/bank-lsst-vae.npz \
        --checkpoint .npe/ckpt.pt --out priors/lsst-vae-amortized

CPU recipe (< 1 h on 2 cores): ``train --device cpu --steps 3000 --batch-size 96
--time-budget 3300`` (~0.3 M scenes). See docs/amortized.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _light_import():
    """Import the torch-only modules without the package ``__init__`` chain (which needs
    GalSim, Pyro and astropy) when those are absent, as on a bare GPU machine."""
    try:
        import galsim  # noqa: F401
        import pyro  # noqa: F401
        return
    except ImportError:
        pass
    for name in ("probdeblend", "probdeblend.priors", "probdeblend.amortized"):
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [str(REPO / name.replace(".", "/"))]
            sys.modules[name] = m


def _networks(prior_name: str):
    """(decoder, flow, card) of a shipped prior from its safetensors file, torch only."""
    import torch
    from safetensors.torch import load_file

    from probdeblend.priors.flow import LatentFlow
    from probdeblend.priors.nets import Decoder

    card = json.loads((REPO / "priors" / f"{prior_name}.json").read_text())
    tensors = load_file(str(REPO / "priors" / f"{prior_name}.safetensors"))
    arch = card["architecture"]
    dec = Decoder(**{k: arch["decoder"][k] for k in ("n_bands", "stamp_size", "latent_dim",
                                                      "channels")})
    dec.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
    flow = None
    if arch.get("flow"):
        flow = LatentFlow(**{k: arch["flow"][k] for k in ("dim", "n_layers", "hidden", "s_max")})
        flow.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("flow.")})
    for m in (dec, flow):
        if m is not None:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    torch.set_flush_denormal(True)
    return dec, flow, card


def cmd_bank(a):
    import probdeblend as pb
    from probdeblend.amortized.npe import simulator_bank

    prior = pb.load_prior(a.prior)
    bank = simulator_bank(prior, n_flux=a.n_flux, seed=a.seed, n_population=a.n_population)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(a.out, **bank)
    print({k: getattr(v, "shape", v) for k, v in bank.items()})


def _config(a):
    from probdeblend.amortized.npe import NPEConfig

    warmup = a.warmup if a.warmup is not None else min(500, max(1, a.steps // 20))
    return NPEConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, rank=a.rank,
                     seed=a.seed, warmup_steps=warmup,
                     pool_size=a.pool_size, pool_refresh=a.pool_refresh,
                     analytic_fraction=a.analytic_fraction, faint_fraction=a.faint_fraction,
                     aperture=a.aperture)


def _encoder(cfg: dict, n_bands: int, stamp_size: int, latent_dim: int):
    """The NPE encoder of a recipe (``NPEConfig.to_dict()``, as stored in checkpoints)."""
    from probdeblend.amortized.network import AmortizedEncoder

    return AmortizedEncoder(n_bands, stamp_size, latent_dim, tuple(cfg["channels"]),
                            cfg["hidden"], shape_head=True, rank=cfg["rank"],
                            aperture=cfg.get("aperture", False))


def cmd_train(a):
    _light_import()
    import torch

    from probdeblend.amortized.npe import BlendSimulator, train_npe

    dev = torch.device(a.device if a.device != "auto" else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(a.threads)
    bank = dict(np.load(a.bank))
    dec, flow, card = _networks(a.prior)
    cfg = _config(a)
    sim = BlendSimulator(dec, flow, bank, cfg, dev)
    bands = tuple(card["frame"]["bands"])
    model = _encoder(cfg.to_dict(), len(bands), int(bank["stamp_size"]), dec.latent_dim)
    if a.init:  # warm start from weights of the same architecture (e.g. a CPU run)
        model.load_state_dict(_init_weights(a.init))
    hist = train_npe(model, sim, cfg, a.checkpoint, a.time_budget, log_every=a.log_every,
                     eval_every=a.eval_every, bands=bands, progress=False, export=a.export)
    if a.throughput:
        hist["throughput"] = (_throughput(model, sim, dev) if dev.type == "cuda"
                              else _throughput(model, sim, dev, n=512, batch=256))
    if a.history_out:
        Path(a.history_out).write_text(json.dumps(hist, indent=1))
    print(json.dumps({"device": str(dev), "throughput": hist.get("throughput"),
                      "steps_done": hist["steps_done"],
                      "scenes_seen": hist["scenes_seen"], "wall_s": round(hist["wall_s"], 1),
                      "last_eval": hist["eval"][-1] if hist["eval"] else None}, indent=1))


def _init_weights(path: str) -> dict:
    """Encoder weights to start from: an export or checkpoint of :func:`train_npe` (``.pt``)
    or a shipped encoder (``priors/<name>-amortized.safetensors``, keys ``model.*``). Read
    with safetensors alone, not ``read_amortized``: the GPU machine has no GalSim or Pyro,
    which the package's loaders import (as :func:`_networks` does for the prior)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k[6:]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _throughput(model, sim, dev, n: int = 32768, draws: int = 200, batch: int = 8192,
                flux_sys: float = 0.06, df: float = 3.0) -> dict:
    """Sources/s of the fast path on ``dev``, on simulated cutouts, two ways.

    ``sources_per_s``: encoder forward pass plus ``draws`` joint draws per source of q's
    flux, offset and e groups (no decode). ``sources_per_s_photometry``: the fast path as
    ``deblend`` runs it per source: encoder, one decode of q's mean latent, its template
    rendered through the scene's PSF at q's mean offset, the closed-form flux per band
    (inverse-variance weighted), then ``draws`` flux draws (statistical Gaussian plus one
    Student-t relative systematic per source, ``flux_sys``, ``df``) and ``draws`` e draws
    from q. Neighbours are not solved jointly here (one source per cutout), detection and
    I/O are not included.
    """
    import time

    import torch

    from probdeblend.render import render

    gen = torch.Generator(device=dev)
    gen.manual_seed(123)
    data = [sim.sample(batch, gen) for _ in range(n // batch)]
    model.eval()
    D, n_pix = model.latent_dim, sim.n
    c = (n_pix - 1) / 2.0
    student = torch.distributions.StudentT(torch.tensor(df, device=dev))

    def q_draws(out):
        loc = torch.cat([out[f"{g}_loc"] for g in model.groups], -1)
        sd = torch.cat([out[f"{g}_log_scale"] for g in model.groups], -1).exp()
        w = out["factor"]
        eps = torch.randn(draws, *loc.shape, device=dev)
        xi = torch.randn(draws, loc.shape[0], w.shape[-1], device=dev)
        return loc, loc + sd * (eps + torch.einsum("spr,nsr->nsp", w, xi))

    def run(photometry: bool):
        total = 0.0
        for d in data:
            out = model(d["images"], d["sigmas"], d["psf_fwhm"])
            loc, v = q_draws(out)
            if not photometry:
                # flux, offset and e draws (exp: flux; the sum keeps the work from being skipped)
                total += float(v[..., D:].exp().sum())
                continue
            nb = d["images"].shape[1]
            stamps = sim.decoder(loc[:, :D])[:, None]                 # (N, 1, B, s, s)
            pos = (c + loc[:, D + nb:D + nb + 2])[:, None]           # (N, 1, 2)
            ones = torch.ones(loc.shape[0], 1, nb, device=dev)
            t = render(stamps, ones, pos, sim.kernel_ft[d["psf_index"]], sim.freqs,
                       (n_pix, n_pix), torch)                         # (N, B, n, n)
            w = 1.0 / d["sigmas"] ** 2                                 # (N, B)
            tt = (t * t).sum((-2, -1)) * w
            flux = (t * d["images"]).sum((-2, -1)) * w / tt            # (N, B)
            sd_stat = tt.rsqrt()
            sys = flux_sys * student.sample((draws, loc.shape[0], 1))
            f = flux * (1 + sys) + sd_stat * torch.randn(draws, *flux.shape, device=dev)
            e = v[..., -2:]
            total += float(f.sum() + e.sum())
        return total

    res = {"sources": n, "draws_per_source": draws,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    with torch.inference_mode():
        for key, phot in (("sources_per_s", False), ("sources_per_s_photometry", True)):
            run(phot)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(phot)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            res[key], res[key.replace("sources_per_s", "seconds")] = n / dt, dt
    model.train()
    return res


def cmd_save(a):
    import torch

    import probdeblend as pb
    from probdeblend.amortized import save_amortized
    from probdeblend.priors.io import machine_description

    prior = pb.load_prior(a.prior)
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    cfg = state["config"]
    model = _encoder(cfg, prior.frame.n_bands, prior.frame.stamp_size, prior.latent_dim)
    model.load_state_dict(state["model"])
    hist = state["hist"]
    # earlier stages this run was initialised from (--init), oldest first
    stages = []
    for path in [*a.previous, a.checkpoint]:
        st = state if path == a.checkpoint else torch.load(path, map_location="cpu",
                                                            weights_only=False)
        c = st["config"]
        stages.append({"file": Path(path).name, "steps": st["step"],
                       "batch_size": c["batch_size"], "lr": c["lr"],
                       "scenes": st["step"] * c["batch_size"], "seed": c.get("seed"),
                       "warmup_steps": c.get("warmup_steps"),
                       "wall_time_s": round(st["hist"]["wall_s"], 1)})
    card = {
        "name": Path(a.out).name, "prior": {"name": prior.name, "sha256": prior.card["sha256"]},
        "frame": prior.frame.to_dict(),
        "training": {**cfg, "method": "neural posterior estimation on blends simulated by the "
                                      "model's own forward model (probdeblend.amortized.npe)",
                     "steps_done": sum(x["steps"] for x in stages),
                     "scenes_seen": sum(x["scenes"] for x in stages),
                     "wall_time_s": round(sum(x["wall_time_s"] for x in stages), 1),
                     "stages": stages, "device": a.trained_on,
                     "loss": "q negative log-density (low-rank + diagonal Gaussian)",
                     "history": {k: hist[k] for k in ("step", "loss", "lr", "scenes_per_s")}},
        "validation": hist["eval"][-1] if hist["eval"] else {},
        "machine": machine_description(),
    }
    path = save_amortized(a.out, model, card)
    print(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bank")
    b.add_argument("--prior", default="lsst-vae")
    b.add_argument("--out", required=True)
    b.add_argument("--n-flux", type=int, default=200_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-population", type=int, default=100_000,
                   help="analytic bulge+disk galaxies in the bank (0: none)")
    t = sub.add_parser("train")
    t.add_argument("--prior", default="lsst-vae")
    t.add_argument("--bank", required=True)
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default min(500, steps/20)); keep it short with "
                        "--time-budget on a warm start, or the budget ends inside the warm-up")
    t.add_argument("--pool-size", type=int, default=0,
                   help="decoded-galaxy pool (0: fresh draws per scene; CPU: ~8192)")
    t.add_argument("--pool-refresh", type=float, default=0.05)
    t.add_argument("--analytic-fraction", type=float, default=0.5,
                   help="fraction of sources drawn from the analytic bulge+disk population")
    t.add_argument("--faint-fraction", type=float, default=0.1,
                   help="fraction of targets dimmed by up to 4 mag")
    t.add_argument("--no-aperture", dest="aperture", action="store_false",
                   help="encoder without the aperture S/N features (v0.2 architecture)")
    t.add_argument("--init", default=None,
                   help="start from these weights (an export .pt, or a shipped encoder's "
                        ".safetensors)")
    t.add_argument("--export", default=None,
                   help="also write weights + history alone here at every eval")
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--time-budget", type=float, default=None)
    t.add_argument("--log-every", type=int, default=200)
    t.add_argument("--eval-every", type=int, default=2000)
    t.add_argument("--throughput", action="store_true")
    t.add_argument("--history-out", default=None)
    s = sub.add_parser("save")
    s.add_argument("--prior", default="lsst-vae")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--trained-on", default="unknown")
    s.add_argument("--previous", nargs="*", default=[],
                   help="exports of earlier stages this run was --init'ed from (oldest first)")
    a = ap.parse_args(argv)
    {"bank": cmd_bank, "train": cmd_train, "save": cmd_save}[a.cmd](a)


if __name__ == "__main__":
    main()
