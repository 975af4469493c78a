"""Training and evaluation of the amortized encoder on a :class:`TrainingSet`.

See :mod:`probdeblend.amortized` for the conventions.
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

from .constants import AMORTIZED_CHANNELS
from .features import DIHEDRAL_MATRICES, centroid_features, dihedral
from .io import save_amortized
from .network import AmortizedEncoder, gaussian_nll
from .posterior import AmortizedPosterior
from .training_set import TrainingSet, _as_prior


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class AmortizedTrainConfig:
    """Recipe of an amortized-encoder training run (stored in the model card).

    Parameters
    ----------
    channels : tuple of int
        Widths of the stride-2 convolutions (:class:`AmortizedEncoder`).
    hidden : int
        Width of the MLP head.
    epochs, batch_size : int
    lr : float
        Adam learning rate; cosine decay per step to ``lr_min_factor * lr``.
    weight_decay : float
    grad_clip : float or None
        Global gradient-norm clip (None = off).
    seed : int
        Seeds the weights (``torch.manual_seed``), the split, the shuffling and the augmentation
        (``numpy.random.default_rng([seed, epoch])``).
    val_fraction : float
        Scenes held out (never trained on) for validation.
    augment : bool
        Random dihedral transform (8 rotations / flips) of every training cutout, with the
        offset and latent targets transformed accordingly.
    mask_prob : float
        Probability that a training cutout loses a strip (1 to n/3 pixels) along one random
        edge (zero, weight 0), as cutouts near scene edges do.
    num_threads : int or None
        ``torch.set_num_threads`` for the run.
    channels_last : bool
        Channels-last memory format (faster convolutions on CPU).
    metric_band : str
        Band of the flux metrics reported in the card (falls back to the middle band).
    """

    channels: tuple[int, ...] = AMORTIZED_CHANNELS
    hidden: int = 256
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_min_factor: float = 0.01
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    mask_prob: float = 0.1
    num_threads: int | None = None
    channels_last: bool = True
    metric_band: str = "r"
    nll_beta: float = 0.5
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        for name in ("epochs", "batch_size", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RESUME_FREE = ("epochs", "num_threads", "extra", "metric_band")


def split_scenes(n: int, config: AmortizedTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train, val)`` scene indices (depends on ``n`` and ``config.seed`` only)."""
    perm = np.random.default_rng([int(config.seed), 7]).permutation(int(n))
    n_val = int(round(config.val_fraction * n))
    if config.val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _batch(data: TrainingSet, idx, g=None, strips=None):
    """Tensors of scenes ``idx`` transformed by dihedral elements ``g`` with edge ``strips``.

    ``strips`` is ``(len(idx), 2)`` ints: side (0-3, or -1 for none) and width in pixels.
    """
    idx = np.asarray(idx)
    img = data.image[idx]
    n = img.shape[-1]
    off = data.offset[idx].astype(np.float64)
    if g is None:
        g = np.zeros(len(idx), dtype=np.int64)
    else:
        out = np.empty_like(img)
        for gg in np.unique(g):
            sel = g == gg
            out[sel] = dihedral(img[sel], int(gg))
        img = out
        off = np.einsum("nij,nj->ni", DIHEDRAL_MATRICES[g], off)
    z = data.z[idx, g]
    valid = None
    if strips is not None and np.any(strips[:, 0] >= 0):
        valid = np.ones((len(idx), 1, n, n), dtype=np.float32)
        for k in np.flatnonzero(strips[:, 0] >= 0):
            side, w = int(strips[k, 0]), int(strips[k, 1])
            sl = [slice(None), slice(None)]
            sl[side // 2] = slice(0, w) if side % 2 == 0 else slice(n - w, n)
            valid[k, 0][tuple(sl)] = 0.0
        img = img * valid
    return {
        "images": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
        "sigmas": torch.from_numpy(data.sigma[idx]),
        "psf_fwhm": torch.from_numpy(data.psf_fwhm[idx]),
        "valid": None if valid is None else torch.from_numpy(valid),
        "z": torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)),
        "log_flux": torch.from_numpy(data.log_flux[idx]),
        "offset": torch.from_numpy(off.astype(np.float32)),
    }


def _nll_terms(out: dict, batch: dict, beta: float = 0.0) -> dict:
    """Per-scene NLL terms; ``beta > 0`` weights each element by ``stop_grad(scale^(2 beta))``
    (beta-NLL, Seitzer et al. 2022) - a training loss, equal to the NLL for ``beta = 0``."""
    terms = {}
    for key, tkey in (("z", "z"), ("flux", "log_flux"), ("offset", "offset")):
        loc = out[f"{tkey}_loc"]
        ls = out[f"{tkey}_log_scale"]
        e = gaussian_nll(batch[tkey], loc, ls)
        if beta:
            e = e * torch.exp(2.0 * beta * ls.detach())
        terms[f"nll_{key}"] = e.sum(-1)
    terms["nll"] = terms["nll_z"] + terms["nll_flux"] + terms["nll_offset"]
    return terms


def _predict_tensors(model, data: TrainingSet, idx, chunk: int = 512) -> tuple[dict, dict]:
    """Predictions (numpy, identity transform) on scenes ``idx`` and the summed NLL terms."""
    outs: dict[str, list] = {}
    nll: dict[str, float] = {}
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(idx), chunk):
            b = _batch(data, idx[i : i + chunk])
            o = model(b["images"], b["sigmas"], b["psf_fwhm"])
            for k, v in _nll_terms(o, b).items():
                nll[k] = nll.get(k, 0.0) + float(v.sum())
            for k, v in o.items():
                outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}, nll


def evaluate_amortized(model, data: TrainingSet, idx, metric_band: str = "r") -> dict:
    """Validation metrics of ``model`` on scenes ``idx`` of ``data`` (no augmentation).

    Returns a dict with: ``nll`` (mean per scene, nats; ``nll_z``, ``nll_flux``,
    ``nll_offset``), ``offset_error_median_px`` (median Euclidean error of ``offset_loc``),
    ``log_flux_residual_median`` / ``log_flux_residual_nmad`` in ``metric_band``
    (``NMAD = 1.4826 * median |r - median r|``) and per band, ``z_residual_rms`` (over scenes
    and latent dimensions) next to ``z_true_rms`` (the spread of the targets, the error of a
    no-information guess), and the coverage of the 68% intervals ``loc +- scale``:
    ``coverage68_log_flux`` (metric band), ``coverage68_offset_x``, ``coverage68_z_mean`` (mean
    over latent dimensions) and ``coverage68_z`` (per dimension). A calibrated ``q`` gives 0.683.
    """
    idx = np.asarray(idx)
    bands = list(data.bands)
    bi = bands.index(metric_band) if metric_band in bands else len(bands) // 2
    if len(idx) == 0:
        return {"n": 0}
    p, nll = _predict_tensors(model, data, idx)
    zt, ft, ot = data.z[idx, 0], data.log_flux[idx], data.offset[idx]
    terms = {k: v / len(idx) for k, v in nll.items()}
    fres = p["log_flux_loc"] - ft
    med = np.median(fres, axis=0)
    nmad = 1.4826 * np.median(np.abs(fres - med), axis=0)

    def cover(true, loc, ls):
        return np.mean(np.abs(true - loc) < np.exp(ls), axis=0)

    cz = cover(zt, p["z_loc"], p["z_log_scale"])
    err = np.linalg.norm(p["offset_loc"] - ot, axis=-1)
    cen = np.concatenate(
        [
            centroid_features(data.image[idx[i : i + 512]], data.sigma[idx[i : i + 512]])[:, :2]
            for i in range(0, len(idx), 512)
        ]
    )
    err_cen = np.linalg.norm(cen - ot, axis=-1)
    return {
        "n": int(len(idx)),
        **terms,
        "offset_error_median_px": float(np.median(err)),
        "offset_error_rms_px": float(np.sqrt(np.mean(err**2))),
        "centroid_offset_error_median_px": float(np.median(err_cen)),
        "centroid_offset_error_rms_px": float(np.sqrt(np.mean(err_cen**2))),
        "metric_band": bands[bi],
        "log_flux_residual_median": float(med[bi]),
        "log_flux_residual_nmad": float(nmad[bi]),
        "log_flux_residual_median_per_band": dict(zip(bands, med.tolist(), strict=True)),
        "log_flux_residual_nmad_per_band": dict(zip(bands, nmad.tolist(), strict=True)),
        "z_residual_rms": float(np.sqrt(np.mean((p["z_loc"] - zt) ** 2))),
        "z_true_rms": float(np.sqrt(np.mean((zt - zt.mean(0)) ** 2))),
        "coverage68_log_flux": float(
            cover(ft[:, bi], p["log_flux_loc"][:, bi], p["log_flux_log_scale"][:, bi])
        ),
        "coverage68_offset_x": float(
            cover(ot[:, 0], p["offset_loc"][:, 0], p["offset_log_scale"][:, 0])
        ),
        "coverage68_z_mean": float(cz.mean()),
        "coverage68_z": cz.tolist(),
    }


def _init_output(model: AmortizedEncoder, data: TrainingSet, idx) -> None:
    """Start from the population: output biases = target means / log spreads, small weights."""
    d = model.latent_dim
    z = data.z[idx].reshape(-1, d)
    rel = data.log_flux[idx] - np.log(data.sigma[idx])
    off = data.offset[idx]

    def log_sd(a):
        return np.log(np.maximum(a.std(0), 1e-3))

    cen = centroid_features(data.image[idx[:2048]], data.sigma[idx[:2048]]).numpy()[:, :2]
    off_res = off[:2048] - cen  # the offset head predicts the correction to the centroid
    bias = {
        "z": (z.mean(0), log_sd(z)),
        "log_flux": (rel.mean(0), log_sd(rel)),
        "offset": (np.median(off_res, 0), log_sd(off)),
    }
    with torch.no_grad():
        for name, (loc, ls) in bias.items():
            last = model.heads[name][-1]
            last.weight.mul_(0.1)
            last.bias.copy_(torch.as_tensor(np.concatenate([loc, ls]), dtype=torch.float32))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = Path(str(path) + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_amortized(
    data: TrainingSet,
    config: AmortizedTrainConfig | None = None,
    out_dir=None,
    progress: bool = True,
    resume: bool = False,
    callback=None,
):
    """Train an :class:`AmortizedEncoder` on ``data`` by Gaussian negative log-likelihood.

    The loss per scene is ``-log q(z_true) - log q(log_flux_true) - log q(offset_true)`` under
    the predicted diagonal Gaussians (summed over dimensions), averaged over the batch; Adam
    with a per-step cosine learning-rate decay. Every training cutout gets a random dihedral
    transform (with its offset and latent targets transformed accordingly: the latent target of
    transform ``g`` is the prior's encoding of the transformed clean target, precomputed in
    :class:`TrainingSet`) and, with probability ``mask_prob``, a masked edge strip.

    Parameters
    ----------
    data : TrainingSet
    config : AmortizedTrainConfig
    out_dir : path-like, optional
        ``checkpoint.pt`` is written there after every epoch (weights, optimiser, scheduler,
        history); ``None`` writes none.
    progress : bool
        tqdm progress bar with the running loss.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` (same configuration except ``epochs``,
        ``num_threads``): the result is identical to an uninterrupted run.
    callback : callable, optional
        ``callback(epoch, history)`` after each epoch; returning True stops training.

    Returns
    -------
    model : AmortizedEncoder
        Eval mode, contiguous memory format.
    history : dict
        Per-epoch ``train_nll``, ``val_nll``, ``lr``, ``scenes_per_s``, ``epoch_wall_s``;
        ``val_nll_init`` (before training), ``n_train``, ``n_val``.
    """
    from tqdm.auto import tqdm

    config = config or AmortizedTrainConfig()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    torch.set_flush_denormal(True)
    train_idx, val_idx = split_scenes(len(data), config)
    if len(train_idx) == 0:
        raise ValueError(
            f"no training scenes: {len(data)} scenes, val_fraction {config.val_fraction}"
        )
    torch.manual_seed(config.seed)
    model = AmortizedEncoder(
        data.image.shape[1], data.stamp_size, data.latent_dim, config.channels, config.hidden
    )
    _init_output(model, data, train_idx)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bs = int(config.batch_size)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / bs))
    total = config.epochs * steps_per_epoch
    m = config.lr_min_factor

    def lr_at(step):
        frac = min(step, total) / max(1, total)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: dict = {
        k: [] for k in ("epoch", "train_nll", "val_nll", "lr", "scenes_per_s", "epoch_wall_s")
    }
    history.update(n_train=int(len(train_idx)), n_val=int(len(val_idx)))
    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        old = {k: v for k, v in ck["config"].items() if k not in _RESUME_FREE}
        new = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
        old["channels"] = tuple(old["channels"])
        if old != new or ck["n_scenes"] != len(data):
            raise ValueError(
                f"checkpoint {ckpt} was written with another configuration or data set "
                f"({ck['n_scenes']} scenes); use another out_dir or resume=False"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        history = ck["history"]
        start = int(ck["epoch"])
    else:
        v = evaluate_amortized(model, data, val_idx) if len(val_idx) else {"nll": float("nan")}
        history["val_nll_init"] = v["nll"]

    n = data.stamp_size
    for epoch in range(start, config.epochs):
        rng = np.random.default_rng([int(config.seed), epoch])
        order = rng.permutation(train_idx)
        if config.augment:
            g_all = rng.integers(0, 8, len(order))
        else:
            g_all = np.zeros(len(order), dtype=np.int64)
        strips = np.stack(
            [
                np.where(
                    rng.uniform(size=len(order)) < config.mask_prob,
                    rng.integers(0, 4, len(order)),
                    -1,
                ),
                rng.integers(1, max(2, n // 3 + 1), len(order)),
            ],
            -1,
        )
        model.train()
        tot, t0 = 0.0, time.perf_counter()
        bar = tqdm(
            range(0, len(order), bs),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        for i in bar:
            sl = slice(i, i + bs)
            b = _batch(data, order[sl], g_all[sl], strips[sl])
            out = model(b["images"], b["sigmas"], b["psf_fwhm"], b["valid"])
            loss = _nll_terms(out, b, config.nll_beta)["nll"].mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss)} at epoch {epoch + 1}; lower lr "
                    f"({config.lr}) or set grad_clip"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(b["z"])
            bar.set_postfix(nll=f"{float(loss.detach()):.4g}", refresh=False)
        bar.close()
        wall = time.perf_counter() - t0
        v = evaluate_amortized(model, data, val_idx) if len(val_idx) else {"nll": float("nan")}
        history["epoch"].append(epoch + 1)
        history["train_nll"].append(tot / len(order))
        history["val_nll"].append(v["nll"])
        history["lr"].append(opt.param_groups[0]["lr"])
        history["scenes_per_s"].append(len(order) / wall)
        history["epoch_wall_s"].append(wall)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}: train nll {tot / len(order):.4g}  "
                f"val nll {v['nll']:.4g}  ({len(order) / wall:.0f} scenes/s)"
            )
        if ckpt is not None:
            _atomic_torch_save(
                {
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "n_scenes": len(data),
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": history,
                },
                ckpt,
            )
        if callback is not None and callback(epoch + 1, history):
            break
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return model, history


def build_amortized(
    data: TrainingSet,
    prior,
    out,
    config: AmortizedTrainConfig | None = None,
    workdir=None,
    progress: bool = True,
    resume: bool = False,
    data_recipe: dict | None = None,
) -> Path:
    """Train, validate and save ``out.{safetensors,json}``; return the card path.

    ``prior`` (a :class:`~probdeblend.priors.LearnedPrior` or name) must be the one ``data``
    was built with; its name and sha256 go into the card. Checkpoints go to ``workdir``
    (default ``runs/<out name>-checkpoint``). The card's ``validation`` holds
    :func:`evaluate_amortized` on the held-out scenes.
    """
    from ..priors.io import machine_description

    config = config or AmortizedTrainConfig()
    prior = _as_prior(prior)
    sha = prior.card.get("sha256")
    if data.meta.get("prior_sha256") not in (None, sha):
        raise ValueError(
            f"the training set's latent targets come from prior sha256 "
            f"{data.meta['prior_sha256']} but the given prior has {sha}; rebuild the TrainingSet"
        )
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else Path("runs") / f"{out.name}-checkpoint"
    t0 = time.perf_counter()
    model, history = train_amortized(data, config, workdir, progress=progress, resume=resume)
    wall = time.perf_counter() - t0
    _, val_idx = split_scenes(len(data), config)
    metrics = evaluate_amortized(model, data, val_idx, config.metric_band)
    bench_idx = val_idx if len(val_idx) else np.arange(len(data))
    bench_idx = np.resize(bench_idx, 256)  # one batch of 256 real cutouts (repeated if fewer)
    performance = measure_throughput(
        AmortizedPosterior(model, prior.full_frame),
        data.image[bench_idx],
        data.sigma[bench_idx],
        data.psf_fwhm[bench_idx],
    )
    model.to(memory_format=torch.contiguous_format)
    training = {
        **config.to_dict(),
        "optimizer": "Adam",
        "lr_schedule": "cosine per step",
        "loss": "Gaussian NLL of z, log-flux, offset under the predicted diagonal q (summed)",
        "epochs_run": len(history["epoch"]),
        "n_train": history["n_train"],
        "n_val": history["n_val"],
        "wall_time_s": wall,
        "scenes_per_s": float(np.median(history["scenes_per_s"]))
        if history["scenes_per_s"]
        else None,
        "history": {k: v for k, v in history.items() if isinstance(v, list)},
        "val_nll_init": history.get("val_nll_init"),
        "machine": machine_description(),
    }
    recipe = {k: v for k, v in data.meta.items() if k not in ("prior", "prior_sha256")}
    recipe.update(data_recipe or {})
    card = {
        "name": out.name,
        "frame": prior.full_frame,
        "prior": {"name": prior.name, "sha256": sha},
        "training": training,
        "data": recipe,
        "validation": metrics,
        "performance": performance,
    }
    return save_amortized(out, model, card)


def measure_throughput(posterior, cutouts, sigmas, psf_fwhm, repeats: int = 5) -> dict:
    """Sources per second of :meth:`AmortizedPosterior.predict_batch` on one batch.

    The batch (all of ``cutouts`` in one forward pass) is run once to warm up, then
    ``repeats`` times; the median time is reported with the thread count and the shape.
    """
    n = len(cutouts)
    posterior.predict_batch(cutouts, sigmas, psf_fwhm, batch_size=n)
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        posterior.predict_batch(cutouts, sigmas, psf_fwhm, batch_size=n)
        times.append(time.perf_counter() - t0)
    return {
        "sources_per_s": float(n / np.median(times)),
        "sources_per_s_best": float(n / np.min(times)),
        "batch": int(n),
        "cutout_shape": list(np.shape(cutouts)[1:]),
        "torch_threads": torch.get_num_threads(),
        "what": "AmortizedPosterior.predict_batch (normalisation + forward pass), CPU",
    }


