"""Many tiles, many machines: :func:`deblend_tiles` maps :func:`probdeblend.deblend` over image
tiles with `Dask distributed <https://distributed.dask.org>`_.

* **One task per tile.** Each task reads a tile (a :class:`~probdeblend.Scene` FITS file),
  deblends it and writes its catalogue ``<out>/<tile>.cat.fits`` (or ``.parquet``) atomically;
  only a small status record travels back to the client.
* **Where it runs.** A :class:`dask.distributed.LocalCluster` on this machine by default
  (``n_workers`` processes with ``threads_per_worker`` threads each), any running scheduler
  when ``scheduler="tcp://host:8786"`` is given (e.g. one started by ``dask-jobqueue`` on a
  batch system, or ``dask scheduler`` + ``dask worker`` by hand), an existing
  :class:`~dask.distributed.Client` when ``client=`` is given, or in this process with
  ``client="serial"`` (no Dask; the reference the tests compare against).
* **Failures.** A tile whose task raises is resubmitted once (``retries=1``); if it fails again
  it is recorded with its error (type and message) in the run summary and the manifest, and the
  run goes on with the other tiles.
* **Reruns skip finished tiles**: a tile whose catalogue file exists is not recomputed (the
  writes are atomic, so an existing catalogue is a complete one). ``overwrite=True`` redoes
  everything.
* **Determinism.** Tile ``name`` gets the seed ``SeedSequence([seed, crc32(name)])``: the
  catalogue of a tile does not depend on the order of the tiles, on the number of workers or
  on where it ran. Each task sets torch to ``threads_per_worker`` threads, so floating-point
  reductions are the same everywhere: catalogues are identical to a serial run's.
* **Progress**: a tqdm bar over finished tiles; the manifest ``<out>/run.json`` is rewritten
  (atomically) after every finished tile.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from .errors import ArgumentError

__all__ = ["deblend_tiles", "tile_seed", "catalog_path", "run_tile"]

_EXT = {"fits": ".cat.fits", "parquet": ".cat.parquet"}


def tile_seed(seed: int, name: str) -> int:
    """The seed of tile ``name`` in a run with ``seed`` (independent of tile order)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(str(name).encode())])
    return int(ss.generate_state(1)[0] % (2**31 - 1))


def _tile_name(tile) -> str:
    if isinstance(tile, tuple):
        return str(tile[0])
    name = Path(tile).name
    for suf in (".fits.gz", ".fits.bz2", ".fits", ".fit", ".fz"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(tile).stem


def catalog_path(out_dir, name: str, format: str = "fits") -> Path:  # noqa: A002
    """Where the catalogue of tile ``name`` is written."""
    return Path(out_dir) / f"{name}{_EXT[format]}"


def run_tile(tile, out_path: str, seed: int, deblend_kwargs: dict, threads: int = 1,
             overwrite: bool = False) -> dict:
    """Deblend one tile and write its catalogue (the body of one Dask task).

    ``tile`` is a Scene FITS path or a ``(name, Scene)`` pair. Returns a status dict
    (``tile``, ``status``, ``n_sources``, ``seconds``, ``catalog``, ``error``).
    """
    import torch

    from .catalog import write_catalog
    from .deblend import deblend
    from .scene import Scene

    t0 = time.perf_counter()
    name = _tile_name(tile)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        scene = tile[1] if isinstance(tile, tuple) else Scene.from_fits(tile)
        cat = deblend(scene, seed=int(seed), **deblend_kwargs)
    finally:
        torch.set_num_threads(old_threads)
    cat.add_column(np.full(len(cat), name, dtype=f"U{max(len(name), 1)}"), name="tile",
                   index=0)
    cat.meta["TILE"] = name
    cat.meta["TILESEED"] = int(seed)
    write_catalog(cat, out_path, overwrite=overwrite)
    return {"tile": name, "status": "done", "n_sources": len(cat),
            "seconds": round(time.perf_counter() - t0, 3), "catalog": str(out_path),
            "error": ""}


def _format_error(err: BaseException) -> str:
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(err).__name__}: {err}{where}"[:500]


def _write_manifest(out_dir: Path, records: dict, settings: dict) -> None:
    from .atomic import write_json

    write_json({"settings": settings, "tiles": list(records.values())},
               out_dir / "run.json", overwrite=True)


def _client(client, scheduler, n_workers, threads_per_worker, processes):
    """(client, cluster-to-close) for the requested execution."""
    if client is not None:
        return client, None
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=int(threads_per_worker),
                           processes=bool(processes), dashboard_address=None)
    return Client(cluster), cluster


def deblend_tiles(tiles: Sequence, out_dir, *, client=None, scheduler: str | None = None,
                  n_workers: int = 2, threads_per_worker: int = 1, processes: bool = True,
                  seed: int = 0, format: str = "fits", retries: int = 1,  # noqa: A002
                  overwrite: bool = False, progress: bool = True,
                  **deblend_kwargs: Any) -> Table:
    """Deblend many tiles in parallel; one catalogue file per tile.

    Parameters
    ----------
    tiles : sequence
        Scene FITS paths (:meth:`probdeblend.Scene.to_fits` layout), or ``(name, Scene)``
        pairs. Names (file names without ``.fits``) must be unique.
    out_dir : path
        Folder of the catalogues ``<name>.cat.fits`` / ``.cat.parquet`` and the manifest
        ``run.json``.
    client : dask.distributed.Client or "serial", optional
        An existing client, or ``"serial"`` to run in this process without Dask.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``); ignored with ``client``.
    n_workers, threads_per_worker, processes
        The LocalCluster started when neither ``client`` nor ``scheduler`` is given (closed at
        the end). ``threads_per_worker`` is also the torch thread count of every task.
    seed : int
        Run seed; tile ``name`` uses :func:`tile_seed` ``(seed, name)``.
    format : {"fits", "parquet"}
    retries : int
        Resubmissions of a failed tile before it is recorded as failed.
    overwrite : bool
        Recompute tiles whose catalogue exists (default: skip them).
    progress : bool
        tqdm progress bar.
    **deblend_kwargs
        Passed to :func:`probdeblend.deblend` (``method``, ``num_samples``, ...).

    Returns
    -------
    astropy.table.Table
        One row per tile: ``tile``, ``status`` (``done`` / ``skipped`` / ``failed``),
        ``attempts``, ``n_sources``, ``seconds``, ``catalog``, ``error``; ``meta["WALL"]`` is
        the wall time of the run (s).
    """
    t_run = time.perf_counter()
    if format not in _EXT:
        raise ArgumentError("format", format, f"must be one of {sorted(_EXT)}")
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ArgumentError("retries", retries, "must be a non-negative integer")
    tiles = list(tiles)
    names = [_tile_name(t) for t in tiles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ArgumentError("tiles", dup, "tile names must be unique (file names without "
                                          "extension); rename the duplicates")
    for t in tiles:
        if not isinstance(t, tuple) and not Path(t).exists():
            from .errors import InputNotFoundError

            raise InputNotFoundError(Path(t), argument="tiles")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"seed": int(seed), "format": format, "retries": int(retries),
                "threads_per_worker": int(threads_per_worker),
                "deblend": {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                else repr(v)) for k, v in deblend_kwargs.items()}}
    records: dict[str, dict] = {}
    todo = []
    for tile, name in zip(tiles, names, strict=True):
        path = catalog_path(out_dir, name, format)
        rec = {"tile": name, "status": "pending", "attempts": 0, "n_sources": -1,
               "seconds": float("nan"), "catalog": str(path), "error": "",
               "seed": tile_seed(seed, name)}
        if path.exists() and not overwrite:
            rec["status"] = "skipped"
        else:
            todo.append((tile, name))
        records[name] = rec
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="tiles", unit="tile",
                   initial=len(tiles) - len(todo))

    def finish(name, result=None, err=None):
        rec = records[name]
        if err is None:
            rec.update({k: result[k] for k in ("status", "n_sources", "seconds", "error")})
        else:
            rec.update({"status": "failed", "error": err})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{name}: {rec['status']}")
        _write_manifest(out_dir, records, settings)

    def args(tile, name):
        rec = records[name]
        return (tile, rec["catalog"], rec["seed"], deblend_kwargs, int(threads_per_worker),
                bool(overwrite))

    if client == "serial":
        for tile, name in todo:
            for attempt in range(int(retries) + 1):
                records[name]["attempts"] = attempt + 1
                try:
                    res = run_tile(*args(tile, name))
                except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                    if attempt == int(retries):
                        finish(name, err=_format_error(err))
                    continue
                finish(name, res)
                break
    elif todo:
        from dask.distributed import as_completed

        cl, cluster = _client(client, scheduler, n_workers, threads_per_worker, processes)
        try:
            futures = {}
            for tile, name in todo:
                fut = cl.submit(run_tile, *args(tile, name), pure=False,
                                key=f"deblend-tile-{name}-{os.getpid()}-{time.time_ns()}")
                futures[fut] = name
                records[name]["attempts"] = 1
            ac = as_completed(list(futures))
            for fut in ac:
                name = futures[fut]
                if fut.status == "finished":
                    finish(name, fut.result())
                    continue
                err = fut.exception()
                if records[name]["attempts"] <= int(retries):
                    records[name]["attempts"] += 1
                    tile = next(t for t, n in todo if n == name)
                    new = cl.submit(run_tile, *args(tile, name), pure=False,
                                    key=f"deblend-tile-{name}-retry-{time.time_ns()}")
                    futures[new] = name
                    ac.add(new)
                else:
                    finish(name, err=_format_error(err))
        finally:
            if cluster is not None:
                cl.close()
                cluster.close()
    if bar is not None:
        bar.close()
    _write_manifest(out_dir, records, settings)
    out = Table(rows=[[r["tile"], r["status"], r["attempts"], r["n_sources"], r["seconds"],
                       r["catalog"], r["error"], r["seed"]] for r in records.values()],
                names=["tile", "status", "attempts", "n_sources", "seconds", "catalog",
                       "error", "seed"],
                dtype=[str, str, int, int, float, str, str, int]) if records else Table()
    out.meta["WALL"] = round(time.perf_counter() - t_run, 3)
    return out


def read_manifest(out_dir) -> dict:
    """The ``run.json`` manifest of a run folder."""
    return json.loads((Path(out_dir) / "run.json").read_text())
