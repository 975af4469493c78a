"""Many tiles on Dask: identical to a serial run, failures recorded, reruns skip, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probdeblend.catalog import read_catalog
from probdeblend.cli import main
from probdeblend.errors import ArgumentError, InputNotFoundError
from probdeblend.simulate import simulate_field
from probdeblend.tiles import catalog_path, deblend_tiles, tile_seed

KW = {"num_samples": 16, "progress": False}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    paths = []
    for i in range(2):
        p = d / f"tile{i}.fits"
        simulate_field(64, seed=20 + i).to_scene().to_fits(p)
        paths.append(str(p))
    bad = d / "broken.fits"
    bad.write_bytes(b"not a FITS file")
    return paths, str(bad)


def _same(a, b):
    assert a.colnames == b.colnames and len(a) == len(b)
    for c in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[c]), np.asarray(b[c]))


@pytest.fixture(scope="module")
def serial(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    good, bad = tiles
    summary = deblend_tiles(good + [bad], out, client="serial", **KW)
    return out, summary


def test_serial_run_records_failure_and_goes_on(serial):
    out, summary = serial
    status = dict(zip(summary["tile"], summary["status"], strict=True))
    assert status == {"tile0": "done", "tile1": "done", "broken": "failed"}
    row = summary[summary["tile"] == "broken"][0]
    assert row["attempts"] == 2 and "CorruptFileError" in row["error"]
    manifest = json.loads((out / "run.json").read_text())
    assert [t["status"] for t in manifest["tiles"]] == ["done", "done", "failed"]
    cat = read_catalog(catalog_path(out, "tile0"))
    assert np.all(cat["tile"] == "tile0") and cat.meta["TILESEED"] == tile_seed(0, "tile0")
    assert not catalog_path(out, "broken").exists()


@pytest.mark.slow
def test_dask_two_workers_identical_to_serial(tiles, serial, tmp_path):
    good, bad = tiles
    out_s, _ = serial
    # order reversed: seeds follow the tile names, not the order
    summary = deblend_tiles([bad] + good[::-1], tmp_path, n_workers=2, processes=True, **KW)
    status = dict(zip(summary["tile"], summary["status"], strict=True))
    assert status == {"tile0": "done", "tile1": "done", "broken": "failed"}
    assert summary[summary["tile"] == "broken"]["attempts"][0] == 2
    for name in ("tile0", "tile1"):
        _same(read_catalog(catalog_path(tmp_path, name)),
              read_catalog(catalog_path(out_s, name)))


def test_rerun_skips_finished_tiles(tiles, tmp_path):
    good, _ = tiles
    deblend_tiles(good[:1], tmp_path, client="serial", **KW)
    before = catalog_path(tmp_path, "tile0").stat().st_mtime_ns
    s = deblend_tiles(good, tmp_path, client="serial", **KW)
    assert dict(zip(s["tile"], s["status"], strict=True)) == {"tile0": "skipped",
                                                              "tile1": "done"}
    assert catalog_path(tmp_path, "tile0").stat().st_mtime_ns == before
    s = deblend_tiles(good, tmp_path, client="serial", overwrite=True, **KW)
    assert set(s["status"]) == {"done"}


def test_parquet_and_scene_objects(tmp_path):
    scene = simulate_field(48, seed=3).to_scene()
    s = deblend_tiles([("a", scene)], tmp_path, client="serial", format="parquet", **KW)
    assert s["status"][0] == "done"
    assert len(read_catalog(tmp_path / "a.cat.parquet")) == s["n_sources"][0]


def test_seeds_and_argument_errors(tiles, tmp_path):
    assert tile_seed(0, "x") == tile_seed(0, "x") != tile_seed(1, "x")
    good, _ = tiles
    with pytest.raises(ArgumentError, match="unique"):
        deblend_tiles([good[0], good[0]], tmp_path, client="serial")
    with pytest.raises(ArgumentError, match="format"):
        deblend_tiles(good, tmp_path, client="serial", format="csv")
    with pytest.raises(InputNotFoundError):
        deblend_tiles([str(tmp_path / "missing.fits")], tmp_path, client="serial")


def test_cli_deblend(tiles, tmp_path, capsys):
    good, bad = tiles
    rc = main(["deblend", *good, "--out", str(tmp_path), "--serial", "--num-samples", "8"])
    assert rc == 0 and catalog_path(tmp_path, "tile1").exists()
    assert "2 tiles" in capsys.readouterr().out
    rc = main(["deblend", bad, "--out", str(tmp_path), "--serial", "--retries", "0"])
    assert rc == 1
    assert main(["deblend", str(tmp_path / "nope.fits"), "--out", str(tmp_path)]) == 2
