"""Smoke test of benchmarks/validate_priors.py on tiny priors with tiny settings.

Two untrained-quality tiny priors in the LSST model frame (ugrizy, 48-pixel stamps, latent 8):
a VAE with a latent flow and a VAE-GAN without one (the ``N(0, I)``-only path). The script's
``main()`` runs on 40 held-out galaxies and 32 draws; the test checks that the report, the
metrics and the figures exist, that every metric is a finite number, and that ``--update-cards``
merges the metrics into the cards without breaking their checksum.
"""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from probdeblend.priors import ModelFrame, load_prior, read_card
from probdeblend.priors.train import build_tiny_prior

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "validate_priors.py"
FRAME = ModelFrame(bands=("u", "g", "r", "i", "z", "y"), stamp_size=48)


@pytest.fixture(scope="module")
def tiny_priors(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("priors")
    vae = build_tiny_prior(d, name="tiny-vae", frame=FRAME, latent_dim=8, n_galaxies=128)
    gan = build_tiny_prior(
        d, name="tiny-vaegan", frame=FRAME, latent_dim=8, n_galaxies=64, kind="vaegan", flow=False
    )
    return vae, gan


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT), run_name="validate_priors")


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _assert_finite(section, where):
    leaves = list(_leaves(section, where))
    assert leaves, f"{where} holds no metric"
    for path, value in leaves:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
        assert math.isfinite(value), (path, value)


def test_validate_priors_smoke(tiny_priors, script, tmp_path):
    vae, gan = tiny_priors
    out = tmp_path / "results"
    # fmt: off
    argv = ["--priors", str(vae), str(gan.with_suffix("")), "--n", "40", "--n-samples", "32",
            "--seed", "5", "--threads", "1", "--batch-size", "16", "--out", str(out),
            "--update-cards"]
    # fmt: on
    assert script["main"](argv) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["n"] == 40 and metrics["config"]["seed"] == 5
    assert set(metrics["priors"]) == {"tiny-vae", "tiny-vaegan"}
    for floor in metrics["simulator"].values():
        _assert_finite(floor["estimator_floor"], "estimator_floor")
    for name, p in metrics["priors"].items():
        rec = p["reconstruction"]
        for sec in ("r_band", "all_bands"):
            assert set(rec[sec]) >= {"mse_median", "psnr_median", "ssim_median", "mse_mean"}
        assert set(rec["per_band"]) == set(FRAME.bands)
        assert set(rec["aperture_flux_r"]) == {"median_rel_err", "nmad_rel_err"}
        assert {"median_abs_dg", "rms_dg1", "rms_dg2"} <= set(rec["ellipticity"])
        assert {"median_rel_err", "nmad_rel_err"} <= set(rec["size"])
        _assert_finite(rec, f"{name}.reconstruction")
        _assert_finite(p["latent_log_prob"], f"{name}.latent_log_prob")
        _assert_finite(p["realism"], f"{name}.realism")
        for stats in p["realism"].values():
            for key in ("hlr", "abs_g", "colour_gradient"):
                assert 0.0 <= stats[key]["ks_stat"] <= 1.0
                assert 0.0 <= stats[key]["ks_pvalue"] <= 1.0
    # the flow prior is compared with N(0, I); the prior without a flow only has N(0, I)
    assert set(metrics["priors"]["tiny-vae"]["realism"]) == {"flow", "N(0,I)"}
    assert "flow_mean_nats" in metrics["priors"]["tiny-vae"]["latent_log_prob"]
    assert set(metrics["priors"]["tiny-vaegan"]["realism"]) == {"N(0,I)"}

    report = (out / "report.md").read_text()
    assert "n/a" not in report  # no NaN reached the tables
    for text in ("PSNR", "SSIM", "aperture flux", "Estimator floor", "D hlr", "tiny-vaegan",
                 "python benchmarks/validate_priors.py --priors"):  # fmt: skip
        assert text in report
    for fig in metrics["figures"]:
        size = (out / fig).stat().st_size
        assert 0 < size < 400_000, (fig, size)
        assert f"({fig})" in report

    # --update-cards: metrics merged into validation, existing keys kept, checksum still valid
    card = read_card(vae)
    assert "val_loss" in card["validation"]
    held = card["validation"]["heldout"]
    assert (
        held["n"] == 40
        and held["reconstruction"] == metrics["priors"]["tiny-vae"]["reconstruction"]
    )
    assert load_prior(vae).name == "tiny-vae"
    assert read_card(gan)["validation"]["heldout"]["realism"].keys() == {"N(0,I)"}


def test_validate_priors_reports_missing_prior(script, tmp_path):
    from probdeblend.errors import PriorLoadError

    with pytest.raises(PriorLoadError, match="not found"):
        script["main"](["--priors", str(tmp_path / "nope"), "--n", "20", "--out", str(tmp_path)])
