"""Tests of the ``probdeblend`` command line (called in-process through ``cli.main``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from probdeblend.cli import build_parser, main
from probdeblend.dataset import load_dataset
from probdeblend.errors import OutputExistsError

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_subcommands_are_listed():
    assert {"demo", "simulate", "train-prior"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_exits_cleanly(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: probdeblend" in out
    if command is not None:
        assert command in out


def test_missing_or_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_simulate_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["simulate", str(out), "-n", "4", "--size", "24", "--psf-fwhm", "0.4",
               "--shard-size", "2"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 4 and meta["n_shards"] == 2 and meta["kind"] == "isolated"
    assert meta["bands"] == list("ugrizy")
    assert meta["frame"]["psf_fwhm"] == 0.4 and meta["frame"]["stamp_size"] == 24
    arrays, truth, _ = load_dataset(out)
    assert arrays["image"].shape == (4, 6, 24, 24)
    assert len(truth) == 4
    assert "wrote 4 isolated items" in capsys.readouterr().out
    # a second run into the same directory needs --overwrite: one line on stderr, status 2
    capsys.readouterr()
    assert main(["simulate", str(out), "-n", "2", "--size", "24", "--psf-fwhm", "0.4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probdeblend: error:") and "--overwrite" in err
    assert "Traceback" not in err
    with pytest.raises(OutputExistsError):  # --debug: the exception itself, with traceback
        main(["simulate", str(out), "-n", "2", "--size", "24", "--psf-fwhm", "0.4", "--debug"])
    assert main(["simulate", str(out), "-n", "2", "--size", "24", "--psf-fwhm", "0.4",
                 "--bands", "r", "--overwrite", "--noiseless-only"]) == 0
    arrays, _, meta = load_dataset(out)
    assert set(arrays) == {"noiseless", "psf"} and meta["n"] == 2


def test_simulate_blends_default_size(tmp_path):
    out = tmp_path / "blend"
    rc = main(["simulate", str(out), "--kind", "blend", "-n", "2", "--bands", "g", "r",
               "--min-galaxies", "2", "--max-galaxies", "2", "--g1", "0.02"])
    assert rc == 0
    arrays, truth, meta = load_dataset(out)
    assert arrays["image"].shape == (2, 2, 80, 80)  # blends default to 80 px
    assert len(truth) == 4
    np.testing.assert_allclose(meta["blend"]["shear"], [0.02, 0.0])


def test_demo_deblends_and_writes_figures(tmp_path, capsys):
    """The end-to-end demo with the shipped prior (amortized + reweighting, few draws)."""
    path = tmp_path / "d.png"
    assert main(["demo", "--out", str(path), "--method", "amortized", "--num-samples", "50",
                 "--n-galaxies", "2"]) == 0
    assert path.stat().st_size > 1000
    assert (tmp_path / "d-corner.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "posterior summary" in out and "flux_r" in out


def test_demo_simulate_only(tmp_path):
    path = tmp_path / "s.png"
    assert main(["demo", "--out", str(path), "--simulate-only"]) == 0
    assert path.stat().st_size > 1000


# -- help, version, error handling -------------------------------------------------------------
def test_version(capsys):
    import probdeblend

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"probdeblend {probdeblend.__version__}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help_and_shows_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no line wrapping inside defaults ("lsst-\nvae")
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--debug" in out
    with_default = [a for a in parser._actions if a.option_strings and not a.required
                    and a.default not in (None, False, argparse.SUPPRESS)]
    for action in with_default:
        assert f"(default: {action.default})" in " ".join(out.split()), action.option_strings


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "absent.fits"), "--out", str(tmp_path / "r.nc")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("probdeblend: error: scene: ")


# -- fit: output products (inference replaced by a stub: this tests the plumbing) ---------------
@pytest.fixture
def stub_fit(monkeypatch):
    """Replace the inference behind ``probdeblend fit`` by a fast stub; count its calls."""
    import sys

    import arviz as az
    from astropy.table import Table

    from probdeblend import diagnostics

    calls = []

    def fake_fit(scene, **kwargs):
        calls.append(kwargs)
        rng = np.random.default_rng(kwargs.get("seed", 0))
        idata = az.from_dict(posterior={"flux": rng.normal(size=(2, 30, 1))},
                             constant_data={"model_mean": np.zeros(scene.image.shape)})
        idata.attrs["method"] = "stub"
        return idata

    fit_module = sys.modules["probdeblend.fit"]
    monkeypatch.setattr(fit_module, "fit", fake_fit)
    from probdeblend.scene_posterior import PRIORS

    monkeypatch.setattr(PRIORS, "prior", lambda prior: prior)
    monkeypatch.setattr(diagnostics, "summary_table",
                        lambda idata, pareto_k=None: Table({"id": [0], "flux_r": [1.0]}))
    return calls


@pytest.fixture
def scene_fits(tmp_path):
    from probdeblend.scene import Scene

    psf = np.zeros((1, 5, 5), np.float32)
    psf[0, 2, 2] = 1
    path = tmp_path / "scene.fits"
    Scene(np.zeros((1, 32, 32)), 1.0, psf, ["r"], 0.2, positions=[[10.0, 10.0]]).to_fits(path)
    return path


def test_fit_writes_distinct_products_and_refuses_to_overwrite(tmp_path, scene_fits, stub_fit,
                                                                 capsys):
    import arviz as az
    from astropy.table import Table

    out = tmp_path / "out" / "res.nc"
    assert main(["fit", str(scene_fits), "--out", str(out), "--num-samples", "30",
                 "--nuts-budget", "90"]) == 0
    assert stub_fit[-1]["nuts"].max_seconds == 90.0  # the budget reaches fit's NutsConfig
    summary = out.with_suffix(".ecsv")
    assert az.from_netcdf(out).posterior["flux"].shape == (2, 30, 1)
    assert Table.read(summary)["flux_r"][0] == 1.0
    assert f"posterior written to {out}; summary to {summary}" in capsys.readouterr().out
    assert len(stub_fit) == 1
    before = out.read_bytes(), summary.read_bytes()
    # a second run is refused before any inference, and leaves both files as they were
    assert main(["fit", str(scene_fits), "--out", str(out), "--seed", "3"]) == 2
    assert "--out" in capsys.readouterr().err and len(stub_fit) == 1
    assert (out.read_bytes(), summary.read_bytes()) == before
    # --overwrite replaces both, atomically (no temporary files left)
    assert main(["fit", str(scene_fits), "--out", str(out), "--seed", "3", "--overwrite"]) == 0
    assert out.read_bytes() != before[0] and len(stub_fit) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["res.ecsv", "res.nc"]
    # explicit summary path and a plot
    other = tmp_path / "post.nc"
    table = tmp_path / "table.ecsv"
    plot = tmp_path / "fig.png"
    assert main(["fit", str(scene_fits), "--out", str(other), "--summary", str(table),
                 "--plot", str(plot)]) == 0
    assert other.exists() and table.exists() and plot.stat().st_size > 1000
    assert not other.with_suffix(".ecsv").exists()


def test_fit_issue_scenario_out_ecsv_is_refused(tmp_path, scene_fits, stub_fit, capsys):
    """``--out out/res.ecsv`` used to write the posterior and overwrite it with the summary."""
    assert main(["fit", str(scene_fits), "--out", str(tmp_path / "out" / "res.ecsv")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ".nc" in err and "--summary" in err
    assert stub_fit == [] and not (tmp_path / "out").exists()
