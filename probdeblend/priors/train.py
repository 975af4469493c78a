"""Training the learned priors: VAE / VAE-GAN on isolated galaxies, then the latent flow.

Pipeline (what ``probdeblend train`` runs)::

    images (N, band, y, x), noiseless, model frame  ->  train_prior  ->  fit_flow  ->  save_prior

or all at once with :func:`build_prior`.

Likelihood
----------
Each band of each galaxy is normalised to unit sum (galaxies with a non-positive or non-finite
band sum are skipped and counted), and the reconstruction likelihood is a Gaussian with
standard deviation ``recon_sigma`` **in the encoder-input space** of
:func:`~probdeblend.priors.nets.encoder_input`, ``t(x) = asinh(n_pix * x)``:

.. math::

    -\\log p(x | z) = \\sum_{b, j, i} [t(x) - t(\\hat x(z))]^2 / (2 \\sigma^2) + \\text{const}

The asinh compresses the bright core, so the faint outskirts (which carry the size and
ellipticity) are fitted too; the flux scale is not part of the likelihood because the decoder
output is flux-normalised. The loss per galaxy is ``-log p(x|z) + beta * KL(q(z|x) || N(0, I))``
(a beta-VAE; ``beta = 1`` is the ELBO). With ``kind="vaegan"`` (Larsen et al. 2016) the
generator also minimises ``gan_weight`` times the non-saturating adversarial loss
``softplus(-D(t(x_hat)))`` on reconstructions and on decoded prior samples (plus optional
discriminator feature matching), and a discriminator ``D`` is trained alternately with the
standard logistic loss. The reconstruction term sums over ``band * y * x`` pixels (13,824 for
6x48x48), so ``gan_weight`` of order 10 is needed for the adversarial term to matter.

Validation galaxies (a seeded ``val_fraction`` of the usable ones) are never used for training.
The validation loss uses ``z = E[q(z|x)]`` (no sampling) so it is deterministic.

Reproducibility: ``torch.manual_seed(seed)`` before building the networks, a dedicated torch
generator for the reparameterisation / prior noise, and ``numpy.random.default_rng([seed,
epoch])`` for the shuffling, so the same seed and thread count give the same weights on the same
machine, and resuming from a checkpoint continues exactly where the interrupted run was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NO_VALUE, ArgumentError, ArgumentTypeError
from ..training import (
    LoopConfig,
    fit_loop,
    flush_denormals,
    make_scheduler,
    optimizer_step,
    progress_enabled,
    run_record,
    seeded_split,
)
from .flow import LatentFlow, MagnitudeConditional
from .frame import ModelFrame
from .nets import DEFAULT_CHANNELS, Decoder, Discriminator, Encoder, asinh, encoder_input

__all__ = [
    "TrainConfig",
    "train_prior",
    "fit_flow",
    "fit_magnitude_conditional",
    "build_prior",
    "split_indices",
    "usable_mask",
    "toy_galaxies",
    "build_tiny_prior",
]


@dataclass
class TrainConfig:
    """Recipe of a prior training run (stored in the model card).

    Parameters
    ----------
    kind : {"vae", "vaegan"}
    latent_dim : int
    channels : tuple of int
        Encoder widths; the decoder uses them reversed (see :class:`~.nets.Decoder`).
    epochs, batch_size : int
    lr : float
        Adam learning rate of the encoder / decoder.
    lr_schedule : {"cosine", "step", "constant"}
        Per-step cosine decay to ``lr_min_factor * lr``, or ``x lr_gamma`` every
        ``lr_step_epochs`` epochs.
    beta : float
        KL weight (``1`` = ELBO).
    kl_warmup_epochs : int
        Linear ramp of the KL weight from 0 to ``beta`` over this many epochs (0 = none).
    recon_sigma : float
        Standard deviation of the Gaussian reconstruction likelihood in asinh space (module docs).
    gan_weight : float
        Weight of the adversarial generator loss (``kind="vaegan"`` only).
    feature_matching_weight : float
        Weight of the discriminator feature-matching loss (``vaegan`` only; 0 = off).
    disc_channels : tuple of int
    disc_lr : float
    gan_start_epoch : int
        Epoch (0-based) from which the adversarial losses are switched on.
    gan_prior_fraction : float
        Number of decoded prior samples per step in the adversarial losses, as a fraction of
        the batch size (fewer is faster; Larsen et al. use as many as the batch).
    grad_clip : float or None
        Clip the global gradient norm of the generator (None = off).
    seed : int
    val_fraction : float
    num_threads : int or None
        ``torch.set_num_threads`` for the run (None = unchanged).
    channels_last : bool
        Use the channels-last memory format (about 1.3x faster training on CPU).
    flow_layers, flow_hidden, flow_s_max : latent flow architecture (:class:`~.flow.LatentFlow`).
    flow_epochs, flow_batch_size, flow_lr : latent flow fit.
    """

    kind: str = "vae"
    latent_dim: int = 32
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_min_factor: float = 0.01
    lr_step_epochs: int = 10
    lr_gamma: float = 0.3
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    recon_sigma: float = 0.1
    gan_weight: float = 10.0
    feature_matching_weight: float = 0.0
    disc_channels: tuple[int, ...] = (16, 32, 64)
    disc_lr: float = 2e-4
    gan_start_epoch: int = 0
    gan_prior_fraction: float = 0.5
    grad_clip: float | None = None
    seed: int = 0
    val_fraction: float = 0.1
    num_threads: int | None = None
    channels_last: bool = True
    flow_layers: int = 8
    flow_hidden: int = 128
    flow_s_max: float = 2.0
    flow_epochs: int = 20
    flow_batch_size: int = 256
    flow_lr: float = 1e-3
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.disc_channels = tuple(int(c) for c in self.disc_channels)
        if self.kind not in ("vae", "vaegan"):
            raise ArgumentError(
                "kind", self.kind, f"kind must be 'vae' or 'vaegan', got {self.kind!r}"
            )
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ArgumentError("lr_schedule", self.lr_schedule,
                f"lr_schedule must be 'cosine', 'step' or 'constant', got {self.lr_schedule!r}"
            )
        for name in ("latent_dim", "epochs", "batch_size", "flow_batch_size", "flow_layers"):
            if int(getattr(self, name)) < 1:
                raise ArgumentError(
                    name, getattr(self, name),
                    f"{name} must be a positive integer, got {getattr(self, name)}"
                )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ArgumentError(
                "val_fraction", self.val_fraction,
                f"val_fraction must be in [0, 1), got {self.val_fraction}"
            )
        if self.recon_sigma <= 0:
            raise ArgumentError(
                "recon_sigma", self.recon_sigma,
                f"recon_sigma must be positive, got {self.recon_sigma}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- data --------------------------------------------------------------------------------------
def _check_images(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.ndim != 4:
        raise ArgumentError(
            "images", images.shape,
            f"images must be an array (N, band, y, x), got shape {images.shape}"
        )
    if images.shape[-1] != images.shape[-2]:
        raise ArgumentError(
            "images", images.shape,
            f"images must be square stamps, got {images.shape[-2]}x{images.shape[-1]}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ArgumentTypeError(
            "images", images.dtype, f"images must hold floats, got dtype {images.dtype}"
        )
    return images


def usable_mask(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Boolean ``(N,)``: galaxies whose every band has a finite, positive sum (read in chunks)."""
    images = _check_images(images)
    ok = np.empty(images.shape[0], dtype=bool)
    for i in range(0, images.shape[0], chunk):
        s = np.asarray(images[i : i + chunk], dtype=np.float64).sum(axis=(-2, -1))
        ok[i : i + chunk] = np.all(np.isfinite(s) & (s > 0), axis=-1)
    return ok


def split_indices(n_or_images, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train, val)`` indices into the usable galaxies of ``images``.

    ``n_or_images`` is an image array (unusable galaxies are dropped, see :func:`usable_mask`)
    or a number of galaxies. The split depends only on the usable indices and ``config.seed``.
    """
    if isinstance(n_or_images, (int, np.integer)):
        idx = np.arange(int(n_or_images))
    else:
        idx = np.flatnonzero(usable_mask(n_or_images))
    return seeded_split(idx, config.val_fraction, config.seed)


def _batch(images: np.ndarray, idx: np.ndarray, channels_last: bool) -> torch.Tensor:
    """Encoder-input-space batch of galaxies ``idx`` (sorted for memmap-friendly reads)."""
    x = torch.from_numpy(np.ascontiguousarray(images[np.sort(idx)], dtype=np.float32))
    x = encoder_input(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- losses ------------------------------------------------------------------------------------
def _vae_terms(encoder, decoder, x_in, config, gen=None, sample=True):
    loc, log_scale = encoder.forward_transformed(x_in)
    if sample:
        eps = torch.randn(loc.shape, generator=gen)
        z = loc + torch.exp(log_scale) * eps
    else:
        z = loc
    n_pix = x_in.shape[-1] * x_in.shape[-2]
    x_hat = asinh(decoder(z) * n_pix)
    recon = ((x_hat - x_in) ** 2).sum(dim=(1, 2, 3)) / (2.0 * config.recon_sigma**2)
    kl = 0.5 * (loc**2 + torch.exp(2.0 * log_scale) - 2.0 * log_scale - 1.0).sum(-1)
    return recon, kl, x_hat


def _evaluate(encoder, decoder, images, idx, config) -> dict:
    if len(idx) == 0:
        return {"loss": float("nan"), "recon": float("nan"), "kl": float("nan")}
    encoder.eval()
    decoder.eval()
    tot = np.zeros(3)
    with torch.no_grad():
        for i in range(0, len(idx), 256):
            x = _batch(images, idx[i : i + 256], config.channels_last)
            recon, kl, _ = _vae_terms(encoder, decoder, x, config, sample=False)
            tot += [float((recon + config.beta * kl).sum()), float(recon.sum()), float(kl.sum())]
    encoder.train()
    decoder.train()
    tot /= len(idx)
    return {"loss": tot[0], "recon": tot[1], "kl": tot[2]}


_RESUME_FREE = ("epochs", "num_threads", "flow_epochs", "flow_batch_size", "flow_lr", "extra")


# -- training ----------------------------------------------------------------------------------
def train_prior(
    images,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
    callback=None,
):
    """Train a VAE or VAE-GAN prior on noiseless isolated galaxies.

    Parameters
    ----------
    images : ndarray ``(N, band, y, x)``
        Noiseless galaxies in the model frame, any flux unit (each band is normalised to unit
        sum). May be a ``numpy.memmap``: batches are read on demand.
    config : TrainConfig
    out_dir : path-like, optional
        Where ``checkpoint.pt`` is written after every epoch (state dicts, optimisers, RNG
        state, history). ``None`` writes no checkpoint.
    progress : bool
        Show a tqdm progress bar (only when stderr is a terminal) and one line per epoch.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` if it exists (the configuration must match
        except for ``epochs`` and ``num_threads``).
    callback : callable, optional
        ``callback(epoch, history)`` after each epoch; returning ``True`` stops training.

    Returns
    -------
    encoder, decoder : Encoder, Decoder
        In eval mode, standard (contiguous) memory format.
    history : dict
        Per-epoch lists ``train_loss``, ``train_recon``, ``train_kl``, ``val_loss``,
        ``val_recon``, ``val_kl``, ``lr``, ``images_per_s``, ``epoch_wall_s`` (and ``disc_loss``,
        ``gan_loss`` for ``vaegan``), the initial validation loss ``val_loss_init`` and the data
        counts ``n_train``, ``n_val``, ``n_skipped``.
    """
    config = config or TrainConfig()
    images = _check_images(images)
    n_bands, stamp = images.shape[1], images.shape[-1]
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))

    usable = usable_mask(images)
    n_skipped = int((~usable).sum())
    train_idx, val_idx = split_indices(images, config)
    if len(train_idx) == 0:
        raise ArgumentError("images", NO_VALUE,
            f"no usable training galaxies: {n_skipped} of {images.shape[0]} have a non-positive "
            f"or non-finite band sum"
        )

    torch.manual_seed(config.seed)
    encoder = Encoder(n_bands, stamp, config.latent_dim, config.channels)
    decoder = Decoder(n_bands, stamp, config.latent_dim, config.channels)
    disc = Discriminator(n_bands, stamp, config.disc_channels) if config.kind == "vaegan" else None
    if config.channels_last:
        for m in (encoder, decoder, disc):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    gen_params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(gen_params, lr=config.lr)
    bs = int(config.batch_size)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / bs))
    sched = make_scheduler(
        opt,
        config.epochs * steps_per_epoch,
        schedule=config.lr_schedule,
        min_factor=config.lr_min_factor,
        step_every=config.lr_step_epochs * steps_per_epoch,
        gamma=config.lr_gamma,
    )
    noise = torch.Generator().manual_seed(int(config.seed) + 1)
    state = {"encoder": encoder, "decoder": decoder, "opt": opt, "sched": sched, "noise": noise}
    if disc is not None:
        opt_d = torch.optim.Adam(disc.parameters(), lr=config.disc_lr, betas=(0.5, 0.999))
        state.update(disc=disc, opt_d=opt_d)
    hint = f"lower lr ({config.lr}) or gan_weight ({config.gan_weight}), or set grad_clip"

    def step(idx, ctx) -> dict:
        epoch = ctx.epoch
        kl_w = config.beta
        if config.kl_warmup_epochs > 0:
            kl_w = config.beta * min(1.0, (epoch + 1) / config.kl_warmup_epochs)
        use_gan = disc is not None and epoch >= config.gan_start_epoch
        x = _batch(images, idx, config.channels_last)
        recon, kl, x_hat = _vae_terms(encoder, decoder, x, config, gen=noise)
        loss = (recon + kl_w * kl).mean()
        g_adv = torch.zeros(())
        if use_gan:
            disc.requires_grad_(False)
            n_p = max(1, int(round(config.gan_prior_fraction * x.shape[0])))
            z_p = torch.randn((n_p, config.latent_dim), generator=noise)
            n_pix = x.shape[-1] * x.shape[-2]
            x_p = asinh(decoder(z_p) * n_pix)
            d_hat, f_hat = disc(x_hat)
            d_p, _ = disc(x_p)
            g_adv = F.softplus(-d_hat).mean() + F.softplus(-d_p).mean()
            loss = loss + config.gan_weight * g_adv
            if config.feature_matching_weight > 0:
                with torch.no_grad():
                    _, f_real = disc(x)
                fm = ((f_hat - f_real) ** 2).sum(dim=(1, 2, 3)).mean()
                loss = loss + config.feature_matching_weight * fm
            disc.requires_grad_(True)
        optimizer_step(
            loss, opt, params=gen_params, grad_clip=config.grad_clip, scheduler=sched,
            epoch=epoch, hint=hint,
        )
        out = {
            "train_loss": float(loss.detach()),
            "train_recon": float(recon.detach().mean()),
            "train_kl": float(kl.detach().mean()),
        }
        if disc is not None:
            d_loss = torch.zeros(())
            if use_gan:
                d_real, _ = disc(x)
                d_fake, _ = disc(x_hat.detach())
                d_fp, _ = disc(x_p.detach())
                d_loss = F.softplus(-d_real).mean() + 0.5 * (
                    F.softplus(d_fake).mean() + F.softplus(d_fp).mean()
                )
                optimizer_step(d_loss, opt_d, epoch=epoch, hint=hint)
            out.update(disc_loss=float(d_loss.detach()), gan_loss=float(g_adv.detach()))
        return out

    def evaluate() -> dict:
        v = _evaluate(encoder, decoder, images, val_idx, config)
        return {"val_loss": v["loss"], "val_recon": v["recon"], "val_kl": v["kl"]}

    identity = {
        "config": {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE},
        "n_images": int(images.shape[0]),
    }
    with flush_denormals():
        history = fit_loop(
            state,
            step,
            evaluate,
            LoopConfig(config.epochs, bs, config.seed, rate_name="images_per_s"),
            Path(out_dir) / "checkpoint.pt" if out_dir is not None else None,
            train_idx=train_idx,
            resume=resume,
            identity=identity,
            history={
                "n_train": int(len(train_idx)),
                "n_val": int(len(val_idx)),
                "n_skipped": n_skipped,
            },
            progress=progress,
            callback=callback,
        )
    for m in (encoder, decoder):
        m.to(memory_format=torch.contiguous_format)
        m.eval()
    return encoder, decoder, history


def _posterior_params(encoder, images, idx, chunk: int = 512):
    locs, scales = [], []
    encoder.eval()
    with torch.no_grad():
        for i in range(0, len(idx), chunk):
            x = _batch(images, idx[i : i + chunk], channels_last=False)
            loc, log_scale = encoder.forward_transformed(x)
            locs.append(loc)
            scales.append(torch.exp(log_scale))
    d = encoder.latent_dim
    if not locs:
        return torch.zeros((0, d)), torch.zeros((0, d))
    return torch.cat(locs), torch.cat(scales)


def fit_flow(encoder: Encoder, images, config: TrainConfig | None = None, progress: bool = True):
    """Fit a :class:`~.flow.LatentFlow` to the aggregate posterior of ``encoder``.

    Maximum likelihood on fresh draws ``z ~ q(z | x)`` of the training galaxies (same
    deterministic split as :func:`train_prior`, so pass the same images and config) at every
    epoch. The flow's final affine layer is initialised to the mean and standard deviation of the
    aggregate posterior. The returned flow (eval mode) carries ``fit_history`` with per-epoch
    ``train_nll`` and ``val_nll`` (mean negative log-likelihood per latent vector, nats).
    """
    config = config or TrainConfig()
    images = _check_images(images)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    train_idx, val_idx = split_indices(images, config)
    if len(train_idx) == 0:
        raise ArgumentError("images", NO_VALUE, "no usable training galaxies to fit the flow on")
    with flush_denormals():
        return _fit_flow(encoder, images, config, train_idx, val_idx, progress)


def _fit_flow(encoder, images, config, train_idx, val_idx, progress) -> LatentFlow:
    loc, scale = _posterior_params(encoder, images, train_idx)
    vloc, vscale = _posterior_params(encoder, images, val_idx)
    torch.manual_seed(config.seed + 2)
    flow = LatentFlow(
        encoder.latent_dim,
        config.flow_layers,
        config.flow_hidden,
        config.flow_s_max,
        seed=config.seed,
    )
    gen = torch.Generator().manual_seed(config.seed + 3)
    with torch.no_grad():
        mean = loc.mean(0)
        var = ((loc - mean) ** 2).mean(0) + (scale**2).mean(0)
        flow.shift.copy_(mean)
        flow.log_scale.copy_(0.5 * torch.log(var.clamp_min(1e-8)))
        v_z = vloc + vscale * torch.randn(vloc.shape, generator=gen)
    opt = torch.optim.Adam(flow.parameters(), lr=config.flow_lr)
    bs = int(config.flow_batch_size)
    steps = max(1, config.flow_epochs * math.ceil(len(loc) / bs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=config.flow_lr * 0.01)
    hist = {"train_nll": [], "val_nll": []}
    bar = tqdm(
        range(config.flow_epochs),
        desc="latent flow",
        disable=not progress_enabled(progress),
        unit="epoch",
    )
    for epoch in bar:
        flow.train()
        order = torch.from_numpy(
            np.random.default_rng([int(config.seed), 11, epoch]).permutation(len(loc))
        )
        z_all = loc + scale * torch.randn(loc.shape, generator=gen)
        tot = 0.0
        for i in range(0, len(order), bs):
            z = z_all[order[i : i + bs]]
            nll = -flow.log_prob(z).mean()
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
            sched.step()
            tot += float(nll.detach()) * len(z)
        hist["train_nll"].append(tot / len(order))
        flow.eval()
        with torch.no_grad():
            hist["val_nll"].append(float(-flow.log_prob(v_z).mean()) if len(v_z) else float("nan"))
        bar.set_postfix(train=f"{hist['train_nll'][-1]:.4g}", val=f"{hist['val_nll'][-1]:.4g}")
    flow.eval()
    flow.fit_history = hist
    return flow


def fit_magnitude_conditional(prior, images, mags, band: str = "r", degree: int = 2,
                              mag_ref: float | None = None, mag_scale: float | None = None,
                              draws: int = 4, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Fit the magnitude-conditioned base map of ``prior``'s latent flow and attach it.

    The map (:class:`~.flow.MagnitudeConditional`, :meth:`~.flow.MagnitudeConditional.fit`)
    is the linear-Gaussian regression, in the flow's base space, of ``u = flow.inverse(z)`` on
    ``phi(c) = (c, ..., c^degree)``, ``c = (m - mag_ref) / mag_scale``: ``z ~ q(z | x)`` are
    ``draws`` posterior draws of the prior's own encoder per galaxy, ``m`` the galaxies' AB
    magnitudes in ``band``. The flow and the VAE are unchanged.

    Parameters
    ----------
    prior : LearnedPrior
        With a latent flow; its flow gets the map (``prior.flow.context``), replacing any.
    images : array (N, band, y, x)
        Noiseless isolated galaxies in the prior's model frame (any flux scale).
    mags : array (N,)
        Their AB magnitudes in ``band``. Their range becomes the map's clipping range.
    band : str
    degree : int
    mag_ref, mag_scale : float, optional
        Standardisation (default: the median and standard deviation of ``mags``).
    draws : int
        Encoder draws per galaxy.
    val_fraction : float
        Held-out fraction for the reported log-likelihoods.
    seed : int

    Returns
    -------
    dict: the map's config, ``n_train`` / ``n_val``, and held-out mean log-density per latent
    (nats) ``val_logp_marginal`` (the flow alone) and ``val_logp_conditional``.
    """
    images = _check_images(images)
    mags = np.asarray(mags, np.float64).reshape(-1)
    if len(mags) != len(images) or not np.all(np.isfinite(mags)):
        raise ArgumentError("mags", mags.shape, f"mags must be {len(images)} finite AB "
                                                "magnitudes, one per image")
    if prior.flow is None:
        raise ArgumentError("prior", prior.name, "the prior has no latent flow to condition")
    if band not in prior.bands:
        raise ArgumentError("band", band, f"band must be one of the prior's {list(prior.bands)}")
    flow = prior.flow
    flow.context = None
    keep = np.flatnonzero(usable_mask(images))
    train_idx, val_idx = seeded_split(keep, val_fraction, seed)
    gen = torch.Generator().manual_seed(int(seed))

    def base_draws(idx):
        idx = np.sort(idx)  # _posterior_params returns rows in sorted order
        loc, scale = _posterior_params(prior.encoder, images, idx)
        with torch.no_grad():
            z = loc[None] + scale[None] * torch.randn((draws,) + loc.shape, generator=gen)
            u = flow.inverse(z.reshape(-1, loc.shape[-1]))[0].double().numpy()
        return u, np.tile(mags[idx], draws)

    u, m = base_draws(train_idx)
    ctx = MagnitudeConditional.fit(
        u, m, band, degree, (float(mags[keep].min()), float(mags[keep].max())),
        float(np.median(mags[keep])) if mag_ref is None else mag_ref,
        float(np.std(mags[keep])) if mag_scale is None else mag_scale)
    out = {**ctx.config(), "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
           "draws_per_galaxy": int(draws), "seed": int(seed)}
    if len(val_idx):
        vu, vm = base_draws(val_idx)
        with torch.no_grad():
            vz = flow(torch.as_tensor(vu, dtype=torch.float32))[0]
            out["val_logp_marginal"] = float(flow.log_prob(vz).mean())
            flow.context = ctx
            out["val_logp_conditional"] = float(
                flow.log_prob(vz, torch.as_tensor(vm, dtype=torch.float32)).mean())
    flow.context = ctx
    prior.clear_cache()  # the JAX twin and compiled engines must see the new map
    return out


def build_prior(
    images,
    frame: ModelFrame,
    out_dir: str | os.PathLike,
    name: str,
    config: TrainConfig | None = None,
    data: dict | None = None,
    validation: dict | None = None,
    flow: bool = True,
    progress: bool = True,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Path:
    """Train, fit the latent flow, save ``out_dir/name.{safetensors,json}``; return the card path.

    ``data`` is the simulation recipe stored in the card; ``validation`` extra metrics merged
    with the ones computed here (final validation loss / reconstruction / KL, latent-flow
    validation NLL and the same NLL under ``N(0, I)``). Training checkpoints go to
    ``checkpoint_dir`` (default ``out_dir/<name>-checkpoint/``; keep it out of version control).
    """
    from .io import save_prior

    config = config or TrainConfig()
    images = _check_images(images)
    if tuple(images.shape[1:]) != frame.shape:
        raise ArgumentError("images", images.shape,
            f"images have shape (N, {images.shape[1:]}) but the frame {frame.bands} "
            f"needs (N, {frame.shape})"
        )
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    ckpt_dir = (
        Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / f"{name}-checkpoint"
    )
    encoder, decoder, history = train_prior(
        images, config, ckpt_dir, progress=progress, resume=resume
    )
    fl = fit_flow(encoder, images, config, progress=progress) if flow else None
    wall = time.perf_counter() - t0
    metrics = {
        "val_loss": history["val_loss"][-1] if history["val_loss"] else None,
        "val_recon": history["val_recon"][-1] if history["val_recon"] else None,
        "val_kl": history["val_kl"][-1] if history["val_kl"] else None,
        "val_loss_definition": "mean over validation galaxies of -log p(x|z=E[q]) + beta KL",
    }
    if fl is not None:
        metrics["flow_val_nll"] = fl.fit_history["val_nll"][-1]
        _, val_idx = split_indices(images, config)
        vloc, vscale = _posterior_params(encoder, images, val_idx)
        if len(vloc):
            g = torch.Generator().manual_seed(config.seed + 3)
            vz = vloc + vscale * torch.randn(vloc.shape, generator=g)
            nll = 0.5 * (vz**2).sum(-1).mean() + 0.5 * vz.shape[-1] * math.log(2 * math.pi)
            metrics["normal_val_nll"] = float(nll)
    metrics.update(validation or {})
    training = {
        **config.to_dict(),
        "optimizer": "Adam",
        **run_record(history, wall, "images_per_s"),
        "flow_history": fl.fit_history if fl is not None else None,
    }
    card = {
        "name": name,
        "kind": config.kind,
        "frame": frame,
        "training": training,
        "data": data or {},
        "validation": metrics,
    }
    return save_prior(out_dir / name, encoder, decoder, fl, card)


# -- toy data for tests and examples -------------------------------------------------------------
def toy_galaxies(n: int, frame: ModelFrame, seed: int = 0) -> np.ndarray:
    """Simple noiseless bulge + disk galaxies in ``frame`` (for tests and examples only).

    Exponential disk (half-light radius 0.3-1.0 arcsec) plus de Vaucouleurs bulge (0.2-0.6 of
    the disk radius), each sheared (|g| < 0.5, random angle, bulge rounder), centred on the stamp
    centre, convolved with the frame's model PSF. The bulge fraction rises with band index
    (redder bulge: a colour gradient); total fluxes are log-uniform in 10^2 - 10^4 (arbitrary
    units). Returns float32 ``(n, band, y, x)``.
    """
    import galsim

    rng = np.random.default_rng(seed)
    psf = frame.psf()
    nb, s = frame.n_bands, frame.stamp_size
    out = np.empty((n, nb, s, s), dtype=np.float32)
    for k in range(n):
        hlr = rng.uniform(0.3, 1.0)
        g, phi = rng.uniform(0.0, 0.5), rng.uniform(0.0, np.pi)
        g1, g2 = g * np.cos(2 * phi), g * np.sin(2 * phi)
        disk = galsim.Exponential(half_light_radius=hlr).shear(g1=g1, g2=g2)
        bulge = galsim.DeVaucouleurs(half_light_radius=hlr * rng.uniform(0.2, 0.6))
        bulge = bulge.shear(g1=0.5 * g1, g2=0.5 * g2)
        kw = {"nx": s, "ny": s, "scale": frame.pixel_scale}
        d_img = galsim.Convolve(disk, psf).drawImage(**kw).array
        b_img = galsim.Convolve(bulge, psf).drawImage(**kw).array
        bf0 = rng.uniform(0.0, 0.6)
        flux = 10 ** rng.uniform(2, 4)
        for b in range(nb):
            bf = min(1.0, bf0 * (1.0 + 0.5 * b / max(1, nb - 1)))
            out[k, b] = flux * rng.uniform(0.7, 1.3) * (bf * b_img + (1 - bf) * d_img)
    return out


def build_tiny_prior(
    directory: str | os.PathLike,
    name: str = "tiny-prior",
    frame: ModelFrame | None = None,
    n_galaxies: int = 256,
    seed: int = 0,
    kind: str = "vae",
    latent_dim: int = 4,
    epochs: int = 1,
    flow: bool = True,
) -> Path:
    """Train an (untrained-quality) tiny prior on :func:`toy_galaxies` in seconds.

    For tests and examples only: latent 4, channels (4, 8, 8, 8), 3 bands, 24-pixel stamps.
    Returns the card path.
    """
    frame = frame or ModelFrame(bands=("g", "r", "i"), stamp_size=24)
    images = toy_galaxies(n_galaxies, frame, seed=seed)
    cfg = TrainConfig(
        kind=kind,
        latent_dim=latent_dim,
        channels=(4, 8, 8, 8),
        epochs=epochs,
        batch_size=32,
        seed=seed,
        flow_layers=4,
        flow_hidden=16,
        flow_epochs=3,
        flow_batch_size=64,
        lr=3e-3,
        disc_channels=(4, 8),
    )
    return build_prior(
        images,
        frame,
        directory,
        name,
        cfg,
        data={
            "generator": "probdeblend.priors.train.toy_galaxies",
            "n_galaxies": n_galaxies,
            "seed": seed,
        },
        flow=flow,
        progress=False,
    )
