"""Tests of the ``probdeblend`` command line (called in-process through ``cli.main``)."""

from __future__ import annotations

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
