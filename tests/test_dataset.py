"""Tests of probdeblend.dataset: sharded writing, process-count independence, loading, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probdeblend.dataset import StampDataset, load_dataset, write_dataset
from probdeblend.errors import DatasetError
from probdeblend.simulate import BlendConfig, Frame, isolated_stamps

ISO_FRAME = Frame(bands=("g", "r", "i"), stamp_size=24, psf_fwhm=0.4)
BLEND = BlendConfig(frame=Frame(bands=("g", "r", "i"), stamp_size=32), n_galaxies=(2, 3))


def _assert_same(a, b):
    arrays_a, truth_a, _ = a
    arrays_b, truth_b, _ = b
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k])
    assert truth_a.colnames == truth_b.colnames
    for c in truth_a.colnames:
        np.testing.assert_array_equal(truth_a[c], truth_b[c])


@pytest.fixture(scope="module")
def iso_dirs(tmp_path_factory):
    """The same isolated dataset written with 1 and with 2 processes."""
    root = tmp_path_factory.mktemp("iso")
    out = {}
    for p in (1, 2):
        out[p] = write_dataset(root / f"p{p}", n=6, kind="isolated", shard_size=4, seed=3,
                               processes=p, frame=ISO_FRAME, noise=True, progress=False)
    return out


def test_isolated_dataset_independent_of_processes(iso_dirs):
    one, two = load_dataset(iso_dirs[1]), load_dataset(iso_dirs[2])
    _assert_same(one, two)
    arrays, truth, meta = one
    assert set(arrays) == {"noiseless", "image", "variance", "psf"}
    assert arrays["noiseless"].shape == (6, 3, 24, 24)
    assert arrays["image"].dtype == np.float32
    assert arrays["psf"].shape == (3, 41, 41)  # isolated: one frame PSF
    # the two shards hold different galaxies (independent shard seeds)
    assert not np.array_equal(arrays["noiseless"][0], arrays["noiseless"][4])


def test_load_dataset_concatenates_and_reindexes(iso_dirs):
    arrays, truth, meta = load_dataset(iso_dirs[1])
    assert meta["n"] == 6 and meta["n_shards"] == 2 and meta["shard_size"] == 4
    assert meta["kind"] == "isolated" and meta["bands"] == ["g", "r", "i"]
    assert meta["frame"]["stamp_size"] == 24 and meta["frame"]["psf_fwhm"] == 0.4
    assert meta["items_per_s"] > 0
    assert len(truth) == 6
    np.testing.assert_array_equal(truth["item"], np.arange(6))
    # the shards are exactly what isolated_stamps gives for their (spawned) seeds
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(3).spawn(2)]
    first = isolated_stamps(4, ISO_FRAME, seed=seeds[0], noise=True)
    second = isolated_stamps(2, ISO_FRAME, seed=seeds[1], noise=True)
    np.testing.assert_array_equal(arrays["image"][:4], first["image"])
    np.testing.assert_array_equal(arrays["noiseless"][4:], second["noiseless"])
    np.testing.assert_allclose(truth["mag"][4:], second["truth"]["mag"])
    # truth fluxes match the images (24 px = 4.8" stamps truncate the largest galaxies' wings)
    ratio = arrays["noiseless"][:, 1].sum(axis=(-2, -1)) / truth["flux_r"]
    assert np.all((ratio > 0.8) & (ratio < 1.0 + 1e-5))
    only, no_truth, _ = load_dataset(iso_dirs[1], keys=("image",), truth=False)
    assert set(only) == {"image"} and no_truth is None
    with pytest.raises(DatasetError, match="nope"):
        load_dataset(iso_dirs[1], keys=("nope",))


def test_blend_dataset_independent_of_processes(tmp_path):
    kw = dict(n=3, kind="blend", shard_size=2, seed=5, blend=BLEND, progress=False)
    a = write_dataset(tmp_path / "a", processes=1, **kw)
    b = write_dataset(tmp_path / "b", processes=2, **kw)
    da, db = load_dataset(a), load_dataset(b)
    _assert_same(da, db)
    arrays, truth, meta = da
    assert set(arrays) == {"image", "variance", "psf", "noiseless_target"}
    assert arrays["image"].shape == (3, 3, 32, 32)
    assert arrays["psf"].shape == (3, 3, 41, 41)
    assert meta["blend"]["n_galaxies"] == [2, 3]
    assert set(truth["item"]) == {0, 1, 2}
    assert truth["is_target"].sum() == 3
    # each item's first row is its target and its image is the stored noiseless target
    for i in range(3):
        rows = truth[truth["item"] == i]
        assert rows["is_target"][0]
        assert len(rows) in (2, 3)
        ratio = arrays["noiseless_target"][i, 1].sum() / rows["flux_r"][0]
        assert 0.7 < ratio < 1.0 + 1e-5  # 32 px scenes may cut the target's wings


def test_stamp_dataset_with_torch_dataloader(iso_dirs):
    torch = pytest.importorskip("torch")
    ds = StampDataset(iso_dirs[1])
    assert len(ds) == 6
    item = ds[2]
    assert set(item) == {"index", "noiseless"}
    assert item["noiseless"].shape == (3, 24, 24) and item["noiseless"].dtype == torch.float32
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [4, 2]
    arrays, _, _ = load_dataset(iso_dirs[1], keys=("noiseless",), truth=False)
    got = torch.cat([b["noiseless"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, arrays["noiseless"])
    ds2 = StampDataset(iso_dirs[1], keys=("image", "psf"))
    assert ds2[0]["psf"].shape == (3, 41, 41)
    assert ds2[5]["image"].shape == (3, 24, 24)


def test_missing_meta_is_an_incomplete_dataset(tmp_path, iso_dirs):
    with pytest.raises(DatasetError, match="meta.json"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError):
        StampDataset(tmp_path)
    # a meta.json that lists shards which are not there
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((iso_dirs[1] / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="missing shards"):
        load_dataset(broken)


def test_rewrite_requires_overwrite(tmp_path):
    kw = dict(n=2, shard_size=2, frame=ISO_FRAME, noise=False, progress=False)
    out = write_dataset(tmp_path / "d", seed=1, **kw)
    before = load_dataset(out)[0]["noiseless"]
    assert set(load_dataset(out)[0]) == {"noiseless", "psf"}
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(tmp_path / "d", seed=2, **kw)
    np.testing.assert_array_equal(load_dataset(out)[0]["noiseless"], before)  # untouched
    write_dataset(tmp_path / "d", seed=2, overwrite=True, **kw)
    assert not np.array_equal(load_dataset(out)[0]["noiseless"], before)
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "bad"}, {"n": 0}, {"shard_size": 0}, {"processes": 0}],
)
def test_bad_arguments_raise_dataset_error(tmp_path, kwargs):
    args = dict(n=2, kind="isolated", frame=ISO_FRAME, progress=False) | kwargs
    with pytest.raises(DatasetError):
        write_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x" / "meta.json").exists()
