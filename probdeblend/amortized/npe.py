"""Neural posterior estimation: train the encoder on blends simulated by the model itself.

The encoder amortizes *this model's* posterior: every training scene is drawn from the scene
model that the exact engines (:mod:`probdeblend.inference`) sample, so that q's draws are
calibrated by training (Papamakarios & Murray 2016; Lueckmann et al. 2017; BLISS, Liu et al.
2023). One training scene (:class:`BlendSimulator`, all in torch, on any device):

1. a target and ``0..max_neighbours`` neighbours, latents ``z = flow(eps)`` drawn from the
   prior, decoded to flux-normalised model-frame stamps;
2. fluxes per band drawn from a table of galaxy fluxes (a GalSim population with SED colours
   and number counts, :func:`flux_table`). For a magnitude-conditioned prior (the shipped
   ones, :class:`probdeblend.priors.flow.MagnitudeConditional`) the fluxes come first and each
   latent is drawn given its own magnitude, ``z = flow(eps, m_r)``, as in the scene model
   (unless a galaxy pool is used, see :class:`NPEConfig`);
3. the target at the cutout centre plus a sub-pixel / detection jitter, neighbours at radii
   ``U(r_min, r_max)`` arcsec in random directions;
4. rendered with :func:`probdeblend.render.render` through the difference kernel of a PSF
   drawn from a bank of the survey's PSFs (Kolmogorov, FWHM x ``U(psf_scale)``);
5. Gaussian pixel noise with the sky variance times a random depth factor plus the sources'
   own Poisson variance.

Targets: the target's ``z``, ``log_flux``, ``offset`` and the reduced shear ``e`` of its
decoded, PSF-free image measured by :func:`probdeblend.measure.shape_torch` (so the fast path
gives ellipticity draws without decoding every draw). The loss is q's negative log-density
(:func:`probdeblend.amortized.q.q_nll`): minimising it over the simulated joint distribution
is neural posterior estimation, whose optimum is the true posterior within q's family.

Galaxies the prior did not make: with ``analytic_fraction > 0`` that fraction of all sources
(targets and neighbours) are analytic bulge + disk galaxies of the GalSim population
(:mod:`probdeblend.amortized.analytic`) with their own fluxes and *true* intrinsic shear as
targets. They have no latent ``z``, so their loss is the negative log-density of q's marginal
over ``(log_flux, offset, e)`` (exact for the low-rank Gaussian: the rows of the other groups).
With ``faint_fraction > 0`` that fraction of targets is dimmed by ``U(0, faint_mags)``
magnitudes, down to below the detection limit, so that q learns to widen towards zero flux.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..measure import shape_torch
from ..model import MAG_PER_LN
from ..render import render
from ..training import atomic_save
from .analytic import AnalyticGalaxies, population_table
from .network import AmortizedEncoder
from .q import q_nll

__all__ = ["NPEConfig", "BlendSimulator", "train_npe", "simulator_bank", "flux_table"]


@dataclass
class NPEConfig:
    """Recipe of an NPE training run (recorded in the model card).

    Attributes
    ----------
    steps, batch_size : int
        Optimiser steps and scenes per step (scenes seen = steps x batch_size).
    lr, lr_min_factor, warmup_steps : float, float, int
        Adam learning rate, cosine decay to ``lr * lr_min_factor``, linear warm-up.
    grad_clip : float
    max_neighbours : int
        Neighbours per scene drawn uniformly in ``0..max_neighbours``.
    neighbour_radius : (float, float)
        Neighbour distance range from the target, arcsec.
    target_jitter : float
        sd (pixels) of the target's offset from the cutout centre on top of the uniform
        sub-pixel part (a detector's position error).
    depth_log_range : (float, float)
        log of the factor applied to the sky variance (a range of depths).
    channels, hidden, rank, aperture : encoder architecture (:class:`AmortizedEncoder`).
    pool_size, pool_refresh : int, float
        0: decode fresh prior draws for every scene (GPU). Otherwise keep a pool of
        ``pool_size`` decoded draws (with their measured e) and replace a fraction
        ``pool_refresh`` of it at every step: each decoded galaxy then serves several scenes
        with other fluxes, neighbours, PSFs and noise, which makes CPU training ~10x cheaper.
        With a magnitude-conditioned prior, pooled galaxies are drawn from the unconditional
        prior (a pooled galaxy serves many fluxes); without a pool each is drawn given its
        own flux's magnitude.
    analytic_fraction : float
        Fraction of sources drawn from the analytic bulge + disk population (module
        docstring; needs a bank with a ``population`` table).
    faint_fraction, faint_mags : float, float
        Fraction of targets dimmed by ``U(0, faint_mags)`` magnitudes.
    seed : int
    """

    steps: int = 20000
    batch_size: int = 512
    lr: float = 1e-3
    lr_min_factor: float = 0.02
    warmup_steps: int = 500
    grad_clip: float = 5.0
    max_neighbours: int = 3
    neighbour_radius: tuple[float, float] = (0.6, 3.0)
    target_jitter: float = 0.3
    depth_log_range: tuple[float, float] = (-0.7, 0.7)
    channels: tuple[int, ...] = (32, 64, 128, 128)
    hidden: int = 256
    rank: int = 8
    pool_size: int = 0
    pool_refresh: float = 0.05
    analytic_fraction: float = 0.0
    faint_fraction: float = 0.0
    faint_mags: float = 4.0
    aperture: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def flux_table(n: int, survey_name: str = "LSST", mag_range=(18.5, 26.5), seed: int = 0):
    """Per-band fluxes (electrons, survey exposure) of ``n`` galaxies of the simulator's
    population (:class:`probdeblend.simulate.GalaxyPopulation`: number counts, SED colours),
    float32 ``(n, band)`` in the survey's band order."""
    from ..simulate import GalaxyPopulation
    from ..survey import get_survey

    survey = get_survey(survey_name)
    pop = GalaxyPopulation(mag_range=tuple(mag_range))
    t = pop.sample(n, survey, np.random.default_rng(seed))
    return np.stack([np.asarray(t[f"flux_{b}"], np.float64) for b in survey.band_names],
                    -1).astype(np.float32)


def simulator_bank(prior, survey_name: str = "LSST", psf_scales=None, n_flux: int = 200_000,
                   psf_size: int = 25, seed: int = 0, n_population: int = 100_000) -> dict:
    """Everything :class:`BlendSimulator` needs besides the prior's networks, as numpy arrays
    (so a GPU machine without GalSim can train): difference kernels of a PSF bank, their FWHMs,
    the sky variance per band, a flux table and (``n_population > 0``) the analytic galaxy
    table of :func:`probdeblend.amortized.analytic.population_table` under keys
    ``pop_<name>``; for a magnitude-conditioned prior, ``mag_band`` (index in the prior's
    bands) and ``mag_zero`` (``m0`` of that band, electrons over the survey exposure). Uses
    GalSim (run it where GalSim is)."""
    from ..amortized.features import psf_fwhm_pixels
    from ..render import SceneRenderer
    from ..survey import get_survey

    survey = get_survey(survey_name).select(prior.bands)
    frame, n = prior.frame, prior.frame.stamp_size
    band = getattr(prior, "magnitude_band", None)  # a magnitude-conditioned prior
    context = ({"mag_band": np.int64(list(prior.bands).index(band)),
                "mag_zero": np.float32(survey.band(band).magnitude_zero)}
               if band in prior.bands else {})
    scales = np.linspace(0.85, 1.35, 24) if psf_scales is None else np.asarray(psf_scales)
    psfs = np.stack([[b.psf_image(psf_size, fwhm=b.psf_fwhm * s) for b in survey]
                     for s in scales])  # (P, B, k, k)
    kern, fwhm = [], []
    for p in psfs:
        r = SceneRenderer(p, (n, n), frame.psf_image(psf_size), n, prior.bands)
        kern.append(r.kernel_ft.astype(np.complex64))
        fwhm.append(psf_fwhm_pixels(p))
    return {
        "kernel_ft": np.stack(kern), "psf_fwhm": np.stack(fwhm).astype(np.float32),
        "freq_y": r.freqs[0].astype(np.float32), "freq_x": r.freqs[1].astype(np.float32),
        "sky": np.array([b.sky_level for b in survey], np.float32),
        "flux": flux_table(n_flux, survey_name, seed=seed)[:, [survey.band_names.index(b)
                                                                for b in prior.bands]],
        "psf_scales": scales.astype(np.float32), "pixel_scale": np.float32(frame.pixel_scale),
        "model_psf_sigma": np.float32(r.model_psf_sigma), "stamp_size": np.int64(n),
        **context,
        **({f"pop_{k}": v for k, v in population_table(
            n_population, survey_name, prior.bands, seed=seed + 1).items()}
           if n_population else {}),
    }


class BlendSimulator:
    """Blends from the model's own prior and forward model, on the fly (see module docstring).

    Parameters
    ----------
    decoder, flow : torch modules of the prior (``prior.decoder``, ``prior.flow``)
    bank : dict from :func:`simulator_bank`
    config : NPEConfig
    device : torch.device
    """

    def __init__(self, decoder, flow, bank: dict, config: NPEConfig, device="cpu"):
        self.device = torch.device(device)
        self.decoder, self.flow, self.config = decoder.to(self.device), flow, config
        if flow is not None:
            self.flow = flow.to(self.device)

        def t(a, dtype=None):
            return torch.as_tensor(np.asarray(a), device=self.device, dtype=dtype)

        self.kernel_ft = t(bank["kernel_ft"])
        self.psf_fwhm = t(bank["psf_fwhm"], torch.float32)
        self.freqs = (t(bank["freq_y"], torch.float32), t(bank["freq_x"], torch.float32))
        self.sky = t(bank["sky"], torch.float32)
        self.flux = t(bank["flux"], torch.float32)
        #: the band (index) whose magnitude conditions the prior's latent, -1: unconditional
        ctx = None if flow is None else getattr(flow, "context", None)
        self.mag_band = int(bank["mag_band"]) if ctx is not None and "mag_band" in bank else -1
        self.mag_zero = float(bank.get("mag_zero", 0.0))
        self.model_psf_sigma = float(bank["model_psf_sigma"])
        self.pixel_scale = float(bank["pixel_scale"])
        self.n = int(bank["stamp_size"])
        self.latent_dim = int(decoder.latent_dim)
        pop = {k[4:]: v for k, v in bank.items() if k.startswith("pop_")}
        self.analytic = (AnalyticGalaxies(pop, self.n, self.pixel_scale, self.model_psf_sigma,
                                          self.device) if pop else None)
        if config.analytic_fraction > 0 and self.analytic is None:
            raise ValueError("analytic_fraction > 0 needs a bank with a population table "
                             "(simulator_bank(..., n_population > 0))")

    @torch.no_grad()
    def draw_galaxies(self, n: int, gen: torch.Generator, mag: torch.Tensor | None = None):
        """``n`` prior draws: latents ``(n, D)``, decoded stamps ``(n, B, s, s)`` and the
        measured reduced shear ``e`` ``(n, 2)`` with its success flag ``ok`` ``(n,)``.
        ``mag`` ``(n,)``: AB magnitudes for a magnitude-conditioned prior (``z ~ p(z | m)``)."""
        eps = torch.randn(n, self.latent_dim, generator=gen, device=self.device)
        z = eps if self.flow is None else self.flow(eps, mag)[0]
        stamps = self.decoder(z)
        g1, g2, ok = shape_torch(stamps.mean(1), self.model_psf_sigma)
        return z, stamps, torch.stack([g1, g2], -1).nan_to_num(0.0), ok

    @torch.no_grad()
    def _galaxies(self, n: int, gen: torch.Generator):
        size = self.config.pool_size
        if not size:
            return self.draw_galaxies(n, gen)
        if getattr(self, "_pool", None) is None:
            self._pool = list(self.draw_galaxies(size, gen))
        else:
            k = max(1, int(self.config.pool_refresh * size))
            idx = torch.randint(0, size, (k,), generator=gen, device=self.device)
            for part, new in zip(self._pool, self.draw_galaxies(k, gen), strict=True):
                part[idx] = new
        idx = torch.randint(0, size, (n,), generator=gen, device=self.device)
        return tuple(part[idx] for part in self._pool)

    @torch.no_grad()
    def sample(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` scenes: ``images (N, B, n, n)``, ``sigmas``, ``psf_fwhm`` ``(N, B)``,
        ``target (N, D + B + 4)`` (z, log_flux, offset, e), ``ok (N,)`` (shape measured) and
        ``z_known (N,)`` (False for analytic targets, whose z is 0 and not used) and
        ``psf_index (N,)`` (the row of the bank's PSF kernels each scene was rendered with)."""
        cfg, dev, n, D = self.config, self.device, self.n, self.latent_dim
        K = 1 + cfg.max_neighbours

        def rand(*shape):
            return torch.rand(*shape, generator=gen, device=dev)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=dev)

        n_nb = torch.randint(0, cfg.max_neighbours + 1, (batch,), generator=gen, device=dev)
        present = torch.arange(K, device=dev)[None] <= n_nb[:, None]  # (N, K); target always
        # decode only the slots that hold a decoded galaxy: present and not analytic
        # (absent neighbours and analytic galaxies cost no decode)
        sel = (rand(batch, K) < cfg.analytic_fraction if cfg.analytic_fraction > 0
               else torch.zeros(batch, K, dtype=torch.bool, device=dev))
        need, sel = present & ~sel, present & sel
        nb_ = self.flux.shape[1]
        stamps = torch.zeros(batch, K, nb_, n, n, device=dev)
        z = torch.zeros(batch, K, D, device=dev)
        e_all = torch.zeros(batch, K, 2, device=dev)
        ok_all = torch.ones(batch, K, dtype=torch.bool, device=dev)

        def decoded(mag=None):
            n_dec = int(need.sum())
            if n_dec:
                z_d, st_d, e_d, ok_d = (self._galaxies(n_dec, gen) if mag is None
                                        else self.draw_galaxies(n_dec, gen, mag[need]))
                stamps[need], z[need], e_all[need], ok_all[need] = st_d, z_d, e_d, ok_d

        def fluxes():
            rows = torch.randint(0, self.flux.shape[0], (batch, K), generator=gen, device=dev)
            flux = self.flux[rows]
            k = int(sel.sum())
            if k:
                a_st, a_flux, a_g = self.analytic.sample(k, gen)
                stamps[sel], flux[sel], e_all[sel] = a_st, a_flux, a_g
            if cfg.faint_fraction > 0:
                dim = torch.where(rand(batch) < cfg.faint_fraction,
                                  10 ** (-0.4 * cfg.faint_mags * rand(batch)),
                                  torch.ones(batch, device=dev))
                flux = torch.cat([flux[:, :1] * dim[:, None, None], flux[:, 1:]], 1)
            return flux

        if self.mag_band >= 0 and not cfg.pool_size:
            # a magnitude-conditioned prior: fluxes first, then each galaxy given its magnitude
            flux = fluxes()
            decoded(self.mag_zero - MAG_PER_LN * torch.log(
                flux[..., self.mag_band].clamp_min(1e-3)))
        else:  # unconditional (or a pool of galaxies shared across fluxes)
            decoded()
            flux = fluxes()
        z_known = ~sel
        ok = ok_all[:, 0]
        flux = flux * present[..., None]
        c = (n - 1) / 2.0
        off = (rand(batch, 2) - 0.5) + cfg.target_jitter * randn(batch, 2)
        off = off.clamp(-1.5, 1.5)
        r_lo, r_hi = (r / self.pixel_scale for r in cfg.neighbour_radius)
        rad = r_lo + (r_hi - r_lo) * rand(batch, K - 1)
        ang = 2 * math.pi * rand(batch, K - 1)
        nb = c + off[:, None] + torch.stack([rad * torch.cos(ang), rad * torch.sin(ang)], -1)
        pos = torch.cat([c + off[:, None], nb], 1)
        p = torch.randint(0, self.kernel_ft.shape[0], (batch,), generator=gen, device=dev)
        model = render(stamps, flux, pos, self.kernel_ft[p], self.freqs, (n, n), torch)
        lo, hi = cfg.depth_log_range
        var_sky = self.sky[None] * torch.exp(lo + (hi - lo) * rand(batch, 1))  # (N, B)
        var = var_sky[..., None, None] + model.clamp(min=0.0)
        images = model + var.sqrt() * randn(*model.shape)
        target = torch.cat([z[:, 0], torch.log(flux[:, 0]), off, e_all[:, 0]], -1)
        return {"images": images, "sigmas": var_sky.sqrt(), "psf_fwhm": self.psf_fwhm[p],
                "target": target, "ok": ok & torch.isfinite(target).all(-1),
                "z_known": z_known[:, 0], "psf_index": p}


def _q_params(model: AmortizedEncoder, out: dict) -> tuple[torch.Tensor, ...]:
    loc = torch.cat([out[f"{g}_loc"] for g in model.groups], -1)
    ls = torch.cat([out[f"{g}_log_scale"] for g in model.groups], -1)
    return loc, ls, out.get("factor")


def _nll(model, target, loc, ls, fac, z_known=None) -> torch.Tensor:
    """Per-row q negative log-density: the full one where ``z_known``, else that of q's
    marginal over the groups after ``z`` (analytic galaxies have no latent)."""
    full = q_nll(target, loc, ls, fac)
    if z_known is None or bool(z_known.all()):
        return full
    D = model.latent_dim
    marg = q_nll(target[:, D:], loc[:, D:], ls[:, D:], None if fac is None else fac[:, D:])
    return torch.where(z_known, full, marg)


def _loss(model, batch) -> torch.Tensor:
    keep = batch["ok"]
    out = model(batch["images"][keep], batch["sigmas"][keep], batch["psf_fwhm"][keep])
    loc, ls, fac = _q_params(model, out)
    zk = batch.get("z_known")
    return _nll(model, batch["target"][keep], loc, ls, fac,
                None if zk is None else zk[keep]).mean()


@torch.no_grad()
def evaluate_npe(model, batch, bands, metric_band: str = "r") -> dict:
    """NLL and calibration of q on a held-out simulated batch: bias, NMAD and 68 / 95 %
    coverage of the metric band's flux and of e1, e2 (marginals of the low-rank Gaussian)."""
    from .q import AmortizedQ

    model.eval()
    keep = batch["ok"]
    out = model(batch["images"][keep], batch["sigmas"][keep], batch["psf_fwhm"][keep])
    loc, ls, fac = _q_params(model, out)
    tgt = batch["target"][keep]
    zk = batch.get("z_known")
    res = {"nll": float(_nll(model, tgt, loc, ls, fac, None if zk is None else zk[keep]).mean())}
    r = 0 if fac is None else fac.shape[-1]
    q = AmortizedQ(loc.double().cpu().numpy(), ls.exp().double().cpu().numpy(),
                   (fac if r else torch.zeros(*loc.shape, 0)).double().cpu().numpy(),
                   dict(model.groups), np.zeros((loc.shape[0], 2)))
    t = tgt.double().cpu().numpy()
    b = model.latent_dim + list(bands).index(metric_band)
    sd_f = q.sd("log_flux")[:, list(bands).index(metric_band)]
    checks = {f"flux_{metric_band}": (t[:, b], q.loc[:, b], sd_f)}
    if "e" in model.groups:
        sl = q.slice("e")
        for i, name in enumerate(("e1", "e2")):
            checks[name] = (t[:, sl.start + i], q.loc[:, sl.start + i], q.sd("e")[:, i])
    for name, (true, mu, sd) in checks.items():
        d = mu - true
        res[f"{name}_bias"] = float(np.median(d))
        res[f"{name}_nmad"] = float(1.4826 * np.median(np.abs(d - np.median(d))))
        res[f"{name}_cov68"] = float(np.mean(np.abs(d) < sd))
        res[f"{name}_cov95"] = float(np.mean(np.abs(d) < 1.96 * sd))
    model.train()
    return res


def train_npe(model: AmortizedEncoder, simulator: BlendSimulator, config: NPEConfig,
              checkpoint: str | os.PathLike | None = None, time_budget_s: float | None = None,
              log_every: int = 200, eval_every: int = 2000, bands=("u", "g", "r", "i", "z", "y"),
              progress: bool | None = None, export: str | os.PathLike | None = None) -> dict:
    """Train ``model`` by NPE on ``simulator``; resumable from ``checkpoint``.

    Stops after ``config.steps`` or when ``time_budget_s`` runs out (the checkpoint is then
    saved, and a later call continues the same schedule). Returns the history dict (step,
    loss, lr, scenes/s, held-out metrics of :func:`evaluate_npe`). ``export``: also write the
    weights, history and config alone (no optimiser state; a third of the checkpoint's size)
    at every save, e.g. to bring the result back from a machine with a file-size limit.
    """
    from tqdm.auto import tqdm

    dev = simulator.device
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)

    def lr_at(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        f = config.lr_min_factor
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def set_lr(step, wall):
        # with a time budget the cosine runs over wall time, so a run stopped by the budget
        # still ends annealed; otherwise over steps
        if time_budget_s is not None and step >= config.warmup_steps:
            f = config.lr_min_factor
            t = min(1.0, wall / time_budget_s)
            factor = f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t))
        else:
            factor = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = config.lr * factor
        return config.lr * factor
    gen = torch.Generator(device=dev)
    gen.manual_seed(config.seed)
    val_gen = torch.Generator(device=dev)
    val_gen.manual_seed(config.seed + 10_000)
    val = simulator.sample(4096, val_gen)
    hist = {"step": [], "loss": [], "lr": [], "scenes_per_s": [], "eval": [], "wall_s": 0.0}
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].to(gen.get_state().device) if dev.type == "cpu"
                      else state["gen"])
        hist, start = state["hist"], state["step"]
    t0, seen, t_log = time.perf_counter(), 0, time.perf_counter()
    wall0, done = hist["wall_s"], start
    bar = tqdm(total=config.steps, initial=start, disable=progress is False, desc="NPE")

    def wall():
        return wall0 + time.perf_counter() - t0

    def save():
        hist["wall_s"], hist["steps_done"] = wall(), done
        hist["scenes_seen"] = done * config.batch_size
        if ckpt is not None:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(),
                          "gen": gen.get_state(), "hist": hist, "step": done,
                          "config": config.to_dict()}, ckpt)
        if export is not None:
            atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "hist": hist, "step": done, "config": config.to_dict()}, export)

    for step in range(start, config.steps):
        if time_budget_s is not None and wall() > time_budget_s:
            break
        lr = set_lr(step, wall())
        batch = simulator.sample(config.batch_size, gen)
        loss = _loss(model, batch)
        if not torch.isfinite(loss):
            save()
            raise FloatingPointError(f"non-finite NPE loss at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        done = step + 1
        seen += config.batch_size
        bar.update(1)
        if done % log_every == 0:
            now = time.perf_counter()
            hist["step"].append(done)
            hist["loss"].append(loss.item())
            hist["lr"].append(lr)
            hist["scenes_per_s"].append(seen / (now - t_log))
            seen, t_log = 0, now
            bar.set_postfix(loss=f"{loss.item():.2f}")
        if done % eval_every == 0:
            hist["eval"].append({"step": done, **evaluate_npe(model, val, bands)})
            save()
    bar.close()
    if not hist["eval"] or hist["eval"][-1]["step"] != done:
        hist["eval"].append({"step": done, **evaluate_npe(model, val, bands)})
    save()
    return hist
