"""Tests of probdeblend.training: the shared torch loop on a tiny linear regression."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probdeblend import training
from probdeblend.errors import ArgumentError

torch.set_num_threads(1)

X = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


def _run(tmp_path=None, epochs=3, resume=False, callback=None, lr=0.05, seed=0, nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_idx, val_idx = training.seeded_split(len(X), 0.25, seed=seed)
    sched = training.make_scheduler(opt, epochs * math.ceil(len(train_idx) / 8), warmup_steps=2)

    def step(idx, ctx):
        loss = ((model(X[idx]).squeeze(-1) - Y[idx]) ** 2).mean()
        if nan_at is not None and ctx.epoch == nan_at:
            loss = loss * float("nan")
        training.optimizer_step(loss, opt, scheduler=sched, epoch=ctx.epoch)
        return {"train_mse": float(loss.detach())}

    def evaluate():
        with torch.no_grad():
            return {"val_mse": float(((model(X[val_idx]).squeeze(-1) - Y[val_idx]) ** 2).mean())}

    ckpt = tmp_path / "ck.pt" if tmp_path is not None else None
    hist = training.fit_loop(
        {"model": model, "opt": opt, "sched": sched}, step, evaluate,
        training.LoopConfig(epochs, 8, seed, rate_name="rows_per_s"), ckpt,
        train_idx=train_idx, resume=resume, identity={"lr": lr, "n": len(X)},
        history={"n_train": len(train_idx)}, progress=False, callback=callback)
    return model, hist


def test_split_is_seeded_and_disjoint():
    tr, va = training.seeded_split(20, 0.2, seed=3)
    assert len(va) == 4 and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 20
    np.testing.assert_array_equal(va, training.seeded_split(20, 0.2, seed=3)[1])
    assert not np.array_equal(va, training.seeded_split(20, 0.2, seed=4)[1])
    assert len(training.seeded_split(np.array([3, 5, 9]), 0.01, seed=0)[1]) == 1
    with pytest.raises(ArgumentError, match="val_fraction"):
        training.seeded_split(10, 1.0, seed=0)


def test_lr_schedule():
    f = [training.lr_factor(s, 10, warmup_steps=2, min_factor=0.1) for s in range(12)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[10] == pytest.approx(0.1) and f[11] == f[10]
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert training.lr_factor(25, 100, schedule="step", step_every=10, gamma=0.5) == 0.25
    assert training.lr_factor(5, 10, schedule="constant") == 1.0
    with pytest.raises(ArgumentError, match="schedule"):
        training.lr_factor(0, 10, schedule="linear")


def test_loop_learns_and_records(tmp_path):
    model, hist = _run(tmp_path)
    assert hist["epoch"] == [1, 2, 3] and hist["n_train"] == 48
    assert hist["val_mse"][-1] < hist["val_mse_init"]
    assert set(hist) >= {"train_mse", "val_mse", "lr", "rows_per_s", "epoch_wall_s"}
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ck["epoch"] == 3 and set(ck["state"]) == {"model", "opt", "sched"}
    assert not list(tmp_path.glob("*.tmp-*"))
    rec = training.run_record(hist, 1.5, "rows_per_s")
    assert rec["epochs_run"] == 3 and rec["n_train"] == 48 and "machine" in rec


def test_resume_is_exact(tmp_path):
    ref, h_ref = _run(tmp_path / "a")
    _run(tmp_path / "b", callback=lambda epoch, h: epoch == 1)  # interrupted after epoch 1
    resumed, h = _run(tmp_path / "b", resume=True)
    assert h["epoch"] == [1, 2, 3] and h["val_mse"] == h_ref["val_mse"]
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ArgumentError, match=r"cannot resume .* \['lr'\]"):
        _run(tmp_path / "b", resume=True, lr=0.1)


def test_nan_loss_raises_before_the_step():
    with pytest.raises(FloatingPointError, match="at epoch 2"):
        _run(nan_at=1)


def test_flush_denormals_is_scoped():
    was_on = training._flush_is_on()
    torch.set_flush_denormal(False)  # other modules' tests may have switched it on
    try:
        with training.flush_denormals():
            assert training._flush_is_on()
            with training.flush_denormals():
                assert training._flush_is_on()
            assert training._flush_is_on()  # the inner block restores "on"
        assert not training._flush_is_on()
    finally:
        torch.set_flush_denormal(was_on)


def test_progress_off_without_tty():
    assert training.progress_enabled(False) is False
    assert training.progress_enabled(True) is False  # pytest captures stderr: not a terminal
