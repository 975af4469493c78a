"""The torch training loop shared by prior training and amortized-encoder training.

One epoch loop, written once, with the plumbing every training run of probdeblend needs:

* a seeded train / validation split (:func:`seeded_split`);
* a learning-rate schedule per optimiser step: cosine decay with optional linear warm-up, step
  decay or constant (:func:`lr_factor`, :func:`make_scheduler`);
* a seeded shuffle per epoch (``numpy.random.default_rng([seed, epoch])``), so an epoch's batches
  depend only on the seed and the epoch number;
* a NaN / inf check of the loss before each optimiser step (:func:`optimizer_step`);
* a checkpoint after every epoch, written atomically (temporary file + rename,
  :func:`atomic_save`), holding every module, optimiser, scheduler and random generator, and
  resume from it (the resumed run is bit-identical to an uninterrupted one);
* a progress bar (tqdm; off with ``progress=False`` and whenever stderr is not a TTY);
* denormal floats flushed to zero for the duration of the run only (:func:`flush_denormals`).

The caller owns the model and the maths: ``step_fn`` computes one batch's loss and takes the
optimiser step(s) (usually through :func:`optimizer_step`), ``eval_fn`` evaluates on held-out
data. :func:`fit_loop` owns everything else.

Example
-------
.. code-block:: python

    from probdeblend import training

    train_idx, val_idx = training.seeded_split(len(data), val_fraction=0.1, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    sched = training.make_scheduler(opt, steps, warmup_steps=100)

    def step_fn(idx, ctx):                      # idx: the batch's data indices
        loss = loss_of(model, data[idx])
        training.optimizer_step(loss, opt, scheduler=sched, epoch=ctx.epoch)
        return {"train_loss": float(loss)}

    def eval_fn():
        return {"val_loss": val_loss_of(model, data[val_idx])}

    history = training.fit_loop(
        {"model": model, "opt": opt, "sched": sched}, step_fn, eval_fn,
        training.LoopConfig(epochs=epochs, batch_size=batch_size, seed=0),
        "run/checkpoint.pt", train_idx=train_idx, resume=True,
        identity={"config": config.to_dict(), "n_items": len(data)},
    )

Used by :func:`probdeblend.priors.train.train_prior`; the amortized encoder's training adopts it
the same way.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ArgumentError

__all__ = [
    "LoopConfig",
    "EpochContext",
    "fit_loop",
    "optimizer_step",
    "seeded_split",
    "lr_factor",
    "make_scheduler",
    "atomic_save",
    "flush_denormals",
    "progress_enabled",
    "machine_description",
    "run_record",
]


# -- small pieces ------------------------------------------------------------------------------
def _flush_is_on() -> bool:
    # torch has no getter: a product that underflows to a denormal reads 0 when flushing is on
    return bool((torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero on the CPU inside the block; restore the setting after.

    The faint outskirts of decoded galaxies (a softmax over the pixels) reach denormal floats
    (< 1.2e-38), whose arithmetic is ~100x slower on x86 CPUs: decoder gradients ran ~20x and
    training ~3.5x slower without flushing. The setting is process-wide (all threads), so it is
    switched on only for the duration of a training run, never at import or load time.
    """
    was_on = _flush_is_on()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def progress_enabled(progress: bool | None) -> bool:
    """Whether to draw a progress bar: ``progress`` is not False and stderr is a terminal."""
    if progress is False:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and a rename (never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + f".tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def seeded_split(
    items: int | np.ndarray, val_fraction: float, seed: int, salt: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train, val)`` indices, each sorted.

    ``items`` is a number ``n`` (indices ``0 .. n-1``) or an array of the usable indices. The
    split depends only on those indices, ``seed`` and ``salt``: a permutation by
    ``numpy.random.default_rng([seed, salt])``, ``round(val_fraction * n)`` of them (at least
    one when ``val_fraction > 0`` and ``n >= 2``) for validation.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ArgumentError("val_fraction", val_fraction, "must be in [0, 1)")
    idx = np.arange(int(items)) if np.ndim(items) == 0 else np.asarray(items)
    perm = np.random.default_rng([int(seed), int(salt)]).permutation(idx)
    n_val = int(round(val_fraction * len(idx)))
    if val_fraction > 0 and len(idx) >= 2:
        n_val = max(n_val, 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def lr_factor(
    step: int,
    total_steps: int,
    *,
    schedule: str = "cosine",
    min_factor: float = 0.01,
    warmup_steps: int = 0,
    step_every: int = 1,
    gamma: float = 0.3,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    ``"cosine"``: linear warm-up from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then
    ``min_factor + (1 - min_factor) (1 + cos(pi f)) / 2`` with ``f`` the fraction of the
    remaining steps done (``f`` capped at 1). ``"step"``: ``gamma ** (step // step_every)``.
    ``"constant"``: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (step // max(1, int(step_every)))
    if schedule != "cosine":
        raise ArgumentError("schedule", schedule, "must be 'cosine', 'step' or 'constant'")
    warm = max(0, int(warmup_steps))
    if step < warm:
        return (step + 1) / warm
    total = max(1, int(total_steps) - warm)
    frac = min(step - warm, total) / total
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, **schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_factor` (keyword arguments ``schedule``,
    ``min_factor``, ``warmup_steps``, ``step_every``, ``gamma``) once per optimiser step."""
    lr_factor(0, total_steps, **schedule)  # validate now, not at the first step

    def f(step: int) -> float:
        return lr_factor(step, total_steps, **schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    params=None,
    grad_clip: float | None = None,
    scheduler=None,
    epoch: int | None = None,
    hint: str = "lower the learning rate or set grad_clip",
) -> None:
    """Check ``loss`` is finite, then zero the gradients, back-propagate, clip, step.

    Raises ``FloatingPointError`` (naming ``epoch``, 0-based here and 1-based in the message,
    and ``hint``) before any weight is touched when the loss is NaN or infinite. ``params`` are
    the parameters clipped to global norm ``grad_clip`` (default: the optimiser's).
    ``scheduler.step()`` follows the optimiser step.
    """
    if not torch.isfinite(loss.detach()).all():
        where = f" at epoch {epoch + 1}" if epoch is not None else ""
        raise FloatingPointError(f"training loss became {float(loss.detach())}{where}; {hint}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


# -- the loop ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopConfig:
    """Settings of :func:`fit_loop`.

    Parameters
    ----------
    epochs : int
        Total number of epochs (a resumed run continues up to it).
    batch_size : int
    seed : int
        Seeds the per-epoch shuffle, ``default_rng([seed, epoch])``.
    rate_name : str
        History key of the throughput (items per second of training), e.g. ``"images_per_s"``.
    desc : str
        Progress-bar label.
    """

    epochs: int
    batch_size: int
    seed: int = 0
    rate_name: str = "items_per_s"
    desc: str = "epoch"

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if int(v) != v or int(v) < 1:
                raise ArgumentError(name, v, "must be a positive integer")


@dataclass
class EpochContext:
    """What ``step_fn`` learns about the current batch besides its indices.

    Attributes
    ----------
    epoch : int
        0-based epoch number.
    order : ndarray
        This epoch's permutation of ``train_idx``.
    rng : numpy.random.Generator
        ``default_rng([seed, epoch])`` after drawing ``order`` (for per-epoch augmentations).
    position : slice
        Where the batch sits in ``order`` (to index per-epoch arrays drawn by ``epoch_fn``).
    extra : object
        What ``epoch_fn(ctx)`` returned at the start of the epoch (None without one).
    """

    epoch: int
    order: np.ndarray
    rng: np.random.Generator
    position: slice | None = None
    extra: Any = None


def _state_of(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj.state_dict()


def _load_state(obj, state) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def _first_lr(state: Mapping[str, Any]) -> float:
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            return float(obj.param_groups[0]["lr"])
    return float("nan")


def _identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested dicts (lists and tuples compare equal)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _identity_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return [] if norm(old) == norm(new) else [prefix.rstrip(".")]


def fit_loop(
    state: Mapping[str, Any],
    step_fn: Callable[[np.ndarray, EpochContext], Mapping[str, float]],
    eval_fn: Callable[[], Mapping[str, float]] | None,
    config: LoopConfig,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    train_idx: np.ndarray,
    resume: bool = False,
    identity: Mapping[str, Any] | None = None,
    epoch_fn: Callable[[EpochContext], Any] | None = None,
    history: dict | None = None,
    progress: bool | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
) -> dict:
    """Run (or resume) the epoch loop; return the history.

    Parameters
    ----------
    state : dict of str -> object
        Everything a checkpoint must hold: ``torch.nn.Module``, optimisers and schedulers
        (anything with ``state_dict`` / ``load_state_dict``) and ``torch.Generator`` objects,
        under stable names. Modules are put in train mode before each epoch.
    step_fn : callable ``(batch_idx, ctx) -> dict``
        One optimisation step on the items ``batch_idx`` (a slice of this epoch's shuffled
        ``train_idx``; ``ctx`` is an :class:`EpochContext`). Returns scalar metrics keyed by
        their history names (e.g. ``{"train_loss": 1.2}``); the loop averages them over the
        epoch weighted by batch size. The first one labels the progress bar.
    eval_fn : callable ``() -> dict``, or None
        Held-out metrics (e.g. ``{"val_loss": 1.3}``), appended after every epoch; also run once
        before the first epoch of a fresh run and stored as ``<key>_init``. Switch modules to
        eval mode inside it if needed (the loop switches them back to train mode).
    config : LoopConfig
    checkpoint_path : path-like, optional
        Written atomically after every epoch: ``epoch``, ``identity``, ``history`` and
        ``state`` (each object's state). ``None`` writes nothing.
    train_idx : ndarray of int
        Indices of the training items (e.g. from :func:`seeded_split`).
    resume : bool
        Continue from ``checkpoint_path`` if it exists. Its ``identity`` must equal
        ``identity`` (else ``ArgumentError`` naming the differing keys).
    identity : dict, optional
        What must not change across a resume: the configuration minus free entries such as
        ``epochs``, the data size, ...
    epoch_fn : callable ``(ctx) -> object``, optional
        Called at the start of every epoch with ``ctx.order`` and ``ctx.rng`` set; its return
        value is ``ctx.extra`` for the epoch's steps (per-epoch augmentation draws).
    history : dict, optional
        Initial history (scalars such as ``n_train``); per-epoch lists are added to it.
    progress : bool, optional
        False: no bar and no epoch lines. True / None: a bar when stderr is a TTY, and one line
        per epoch when True.
    callback : callable ``(epoch, history) -> bool``, optional
        After each epoch (1-based ``epoch``) and its checkpoint; returning True stops training.

    Returns
    -------
    dict
        ``epoch`` (1-based), the step and eval metrics, ``lr`` (first optimiser's, at the end of
        the epoch), ``config.rate_name`` and ``epoch_wall_s`` per epoch, plus the initial
        entries and ``<eval key>_init``.
    """
    from tqdm.auto import tqdm

    train_idx = np.asarray(train_idx)
    if train_idx.size == 0:
        raise ArgumentError("train_idx", train_idx.size, "no training items to fit on")
    identity = dict(identity or {})
    history = dict(history or {})
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        diff = _identity_diff(ck.get("identity", {}), identity)
        missing = [k for k in state if k not in ck.get("state", {})]
        if diff or missing:
            raise ArgumentError(
                "resume", True,
                f"cannot resume from {ckpt}: the configuration or data differ in {diff}"
                + (f" and the checkpoint lacks {missing}" if missing else "")
                + "; use the original settings, another checkpoint folder, or resume=False",
            )
        for name, obj in state.items():
            _load_state(obj, ck["state"][name])
        history = ck["history"]
        start = int(ck["epoch"])
    elif eval_fn is not None:
        for k, v in eval_fn().items():
            history[f"{k}_init"] = v

    bar_on = progress_enabled(progress)
    bs = int(config.batch_size)
    modules = [m for m in state.values() if isinstance(m, torch.nn.Module)]
    for epoch in range(start, config.epochs):
        rng = np.random.default_rng([int(config.seed), epoch])
        ctx = EpochContext(epoch=epoch, order=rng.permutation(train_idx), rng=rng)
        if epoch_fn is not None:
            ctx.extra = epoch_fn(ctx)
        for m in modules:
            m.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            range(0, len(ctx.order), bs),
            desc=f"{config.desc} {epoch + 1}/{config.epochs}",
            disable=not bar_on,
            leave=False,
            unit="batch",
        )
        for i in bar:
            ctx.position = slice(i, i + bs)
            batch = ctx.order[ctx.position]
            metrics = step_fn(batch, ctx)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
            if metrics:
                k0 = next(iter(metrics))
                bar.set_postfix({k0: f"{float(metrics[k0]):.4g}"}, refresh=False)
        bar.close()
        wall = time.perf_counter() - t0
        n = len(ctx.order)
        row = {k: v / n for k, v in sums.items()}
        if eval_fn is not None:
            row.update(eval_fn())
        row.update({"lr": _first_lr(state), config.rate_name: n / wall, "epoch_wall_s": wall})
        history.setdefault("epoch", []).append(epoch + 1)
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if progress:
            shown = "  ".join(f"{k} {v:.5g}" for k, v in row.items() if k != "epoch_wall_s")
            tqdm.write(f"{config.desc} {epoch + 1}/{config.epochs}: {shown}")
        if ckpt is not None:
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "identity": identity,
                    "history": history,
                    "state": {name: _state_of(obj) for name, obj in state.items()},
                },
                ckpt,
            )
        if callback is not None and callback(epoch + 1, history):
            break
    return history


# -- what a model card records about the run -----------------------------------------------------
def machine_description() -> dict:
    """Machine facts recorded in training cards."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_record(history: Mapping[str, Any], wall_s: float, rate_name: str) -> dict:
    """The model-card ``training`` entries every :func:`fit_loop` run shares.

    ``epochs_run``, the data counts (``n_*`` entries of ``history``), ``wall_time_s``, the
    median of ``history[rate_name]``, the per-epoch ``history`` lists and the
    :func:`machine_description`. Callers add their recipe (configuration, optimiser, loss).
    """
    rates = history.get(rate_name) or []
    return {
        "epochs_run": len(history.get("epoch", [])),
        **{k: v for k, v in history.items() if k.startswith("n_") and not isinstance(v, list)},
        "wall_time_s": float(wall_s),
        rate_name: float(np.median(rates)) if len(rates) else None,
        "history": {k: v for k, v in history.items() if isinstance(v, list)},
        "machine": machine_description(),
    }
