"""Sharded simulated datasets on disk: a writer (multiprocessing, seeds, progress bar) and readers.

Layout of a dataset directory::

    meta.json                 # written last: a directory without it is incomplete
    shard-00000.npz           # arrays, first axis = item (stamp or scene)
    shard-00000-truth.fits    # astropy Table, one row per galaxy, column ``item`` indexes the
    ...                       # item inside the whole dataset

Arrays (float32, electrons per pixel, (band, y, x) per item):

* ``kind="isolated"``: ``noiseless`` and, with noise, ``image`` and ``variance``; ``psf`` is one
  (band, k, k) array per shard (the frame's PSF).
* ``kind="blend"``: ``image``, ``variance``, ``psf`` (item, band, k, k) since the PSF FWHM can vary
  per scene, and ``noiseless_target`` (the target galaxy alone).

Each shard is generated from its own seed, spawned from the dataset seed with
:class:`numpy.random.SeedSequence`, so the content does not depend on the number of processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack

from .atomic import save_npz, write_json, write_table
from .errors import ArgumentError, ArgumentTypeError, DatasetError, OutputExistsError
from .simulate import BlendConfig, Frame, GalaxyPopulation, blend_scene, isolated_stamps
from .validate import check_int, check_seed

__all__ = ["write_dataset", "load_dataset", "StampDataset"]

META = "meta.json"


def _shard_seeds(seed: int, n_shards: int) -> list[int]:
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n_shards)]


def _make_shard(task) -> tuple[int, int, float]:
    (index, n, seed, kind, out_dir, frame, population, blend, noise, max_offset) = task
    t0 = time.perf_counter()
    if kind == "isolated":
        res = isolated_stamps(n, frame, population, seed=seed, noise=noise, max_offset=max_offset)
        arrays = {k: res[k] for k in ("noiseless", "image", "variance", "psf") if k in res}
        truth = res["truth"]
        truth["item"] = np.arange(n)
    else:
        scene_seeds = _shard_seeds(seed, n)
        scenes = [blend_scene(blend, population, seed=s) for s in scene_seeds]
        arrays = {
            "image": np.stack([s.image for s in scenes]),
            "variance": np.stack([s.variance for s in scenes]),
            "psf": np.stack([s.psf for s in scenes]),
            "noiseless_target": np.stack([s.noiseless[0] for s in scenes]),
        }
        tables = []
        for i, s in enumerate(scenes):
            t = s.truth
            t["item"] = i
            t["scene_seed"] = np.uint64(scene_seeds[i])
            t["psf_fwhm_scale"] = t.meta["psf_fwhm_scale"]
            t.meta.clear()
            tables.append(t)
        truth = vstack(tables, metadata_conflicts="silent")
    truth.meta.clear()
    out = Path(out_dir)
    stem = f"shard-{index:05d}"
    # temp file + fsync + rename: a killed run never leaves a half-written shard
    save_npz(out / f"{stem}.npz", overwrite=True, **arrays)
    write_table(truth, out / f"{stem}-truth.fits", overwrite=True, format="fits")
    return index, n, time.perf_counter() - t0


def write_dataset(out_dir, n: int, kind: str = "isolated", shard_size: int = 1000, seed: int = 0,
                  processes: int = 1, frame: Frame | None = None,
                  population: GalaxyPopulation | None = None, blend: BlendConfig | None = None,
                  noise: bool = True, max_offset: float = 0.0, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Simulate ``n`` items (isolated stamps or blended scenes) into sharded files.

    Parameters
    ----------
    out_dir : path
        Created if needed. An existing complete dataset (with ``meta.json``) is refused unless
        ``overwrite``; shards of an interrupted run are regenerated.
    n : int
        Number of stamps (``kind="isolated"``) or scenes (``kind="blend"``).
    kind : {"isolated", "blend"}
    shard_size : int
        Items per shard file.
    seed : int
        Dataset seed; same seed and arguments -> identical files whatever ``processes`` is.
    processes : int
        Worker processes (1 = in this process).
    frame, population, blend, noise, max_offset
        Passed to :func:`probdeblend.simulate.isolated_stamps` / :func:`blend_scene`.
    progress : bool
        Show a tqdm progress bar (items).

    Returns
    -------
    Path of the dataset directory. ``meta.json`` records the recipe, timing and throughput.
    """
    if kind not in ("isolated", "blend"):
        raise DatasetError(f"kind must be 'isolated' or 'blend', got {kind!r}",
                           argument="kind", value=kind)
    try:
        n = check_int("n", n, minimum=1)
        shard_size = check_int("shard_size", shard_size, minimum=1)
        processes = check_int("processes", processes, minimum=1)
        seed = check_seed("seed", seed)
    except ArgumentTypeError:
        raise
    except ArgumentError as e:  # out-of-range values keep their historical class
        raise DatasetError(str(e), argument=e.argument, value=e.value) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).exists():
        if not overwrite:
            raise OutputExistsError(out, f"{out} already holds a dataset; pass overwrite=True "
                                         f"(--overwrite) or choose another directory",
                                    argument="out_dir")
        (out / META).unlink()
    for old in out.glob("shard-*"):
        old.unlink()
    frame = frame or (Frame() if kind == "isolated" else BlendConfig().frame)
    blend = blend or BlendConfig(frame=frame)
    population = population or GalaxyPopulation()
    n_shards = -(-int(n) // int(shard_size))
    sizes = [min(shard_size, n - i * shard_size) for i in range(n_shards)]
    tasks = [(i, sizes[i], s, kind, str(out), frame, population, blend, noise, max_offset)
             for i, s in enumerate(_shard_seeds(seed, n_shards))]
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="scene" if kind == "blend" else "stamp", disable=not progress,
               desc=f"simulate {kind}")
    if processes == 1:
        for t in tasks:
            bar.update(_make_shard(t)[1])
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            for _, k, _ in pool.imap_unordered(_make_shard, tasks):
                bar.update(k)
    bar.close()
    elapsed = time.perf_counter() - t0
    meta = {
        "kind": kind, "n": int(n), "n_shards": n_shards, "shard_size": int(shard_size),
        "seed": int(seed), "processes": int(processes), "noise": bool(noise),
        "max_offset": float(max_offset), "frame": frame.to_dict(),
        "population": asdict(population),
        "blend": blend.to_dict() if kind == "blend" else None,
        "wall_time_s": round(elapsed, 2), "items_per_s": round(n / elapsed, 2),
        "bands": list(frame.band_names),
    }
    write_json(meta, out / META, overwrite=True)
    return out


def _read_meta(path: Path) -> dict:
    if not (path / META).exists():
        raise DatasetError(f"{path} is not a complete probdeblend dataset (no {META}); "
                           f"re-run `probdeblend simulate` into it")
    meta = json.loads((path / META).read_text())
    missing = [i for i in range(meta["n_shards"]) if not (path / f"shard-{i:05d}.npz").exists()]
    if missing:
        raise DatasetError(f"{path} is missing shards {missing[:5]}...; re-run the simulation")
    return meta


def load_dataset(path, keys: tuple[str, ...] | None = None, truth: bool = True):
    """Load a whole dataset into memory.

    Returns
    -------
    (arrays, truth, meta): dict of concatenated arrays (``psf`` of isolated datasets is the
    first shard's, shape (band, k, k)), the truth Table with ``item`` re-indexed over the whole
    dataset (or None), and the meta dict.
    """
    path = Path(path)
    meta = _read_meta(path)
    parts: dict[str, list] = {}
    tables, offset = [], 0
    for i in range(meta["n_shards"]):
        with np.load(path / f"shard-{i:05d}.npz") as z:
            names = keys if keys is not None else z.files
            for k in names:
                if k not in z.files:
                    raise DatasetError(f"array {k!r} not in {path}; available: {z.files}")
                parts.setdefault(k, []).append(z[k])
        if truth:
            t = Table.read(path / f"shard-{i:05d}-truth.fits")
            t["item"] += offset
            tables.append(t)
        offset += min(meta["shard_size"], meta["n"] - i * meta["shard_size"])
    arrays = {}
    for k, v in parts.items():
        arrays[k] = v[0] if (k == "psf" and meta["kind"] == "isolated") else np.concatenate(v)
    return arrays, (vstack(tables) if truth else None), meta


class StampDataset:
    """A map-style ``torch.utils.data.Dataset`` over an on-disk dataset, held in memory.

    Items are dicts of float32 torch tensors for the requested ``keys`` (default
    ``("noiseless",)`` for isolated, ``("image", "variance", "psf", "noiseless_target")`` for
    blends), plus ``index``.
    """

    def __init__(self, path, keys: tuple[str, ...] | None = None):
        import torch

        meta = _read_meta(Path(path))
        if keys is None:
            keys = (("noiseless",) if meta["kind"] == "isolated"
                    else ("image", "variance", "psf", "noiseless_target"))
        arrays, self.truth, self.meta = load_dataset(path, keys)
        self._tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self._n = len(next(iter(v for k, v in self._tensors.items()
                                if not (k == "psf" and meta["kind"] == "isolated"))))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        out = {"index": i}
        for k, v in self._tensors.items():
            out[k] = v if (k == "psf" and self.meta["kind"] == "isolated") else v[i]
        return out
