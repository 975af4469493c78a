"""A survey field in, catalogues out: simulate, cut into tiles, deblend them with Dask.

1. ``simulate_field`` renders an LSST ugrizy field at 10-year depth with the LSST galaxy counts
   and writes its truth catalogue;
2. the field is cut into 2 x 2 tiles written as Scene FITS files (what a survey pipeline hands
   over);
3. ``deblend_tiles`` maps ``probdeblend.deblend`` over the tiles on a Dask LocalCluster (or any
   scheduler with ``--scheduler tcp://host:8786``): one catalogue per tile, with posterior
   summaries of flux per band, ellipticity and position, plus a ``run.json`` manifest;
4. the catalogues are joined and matched to the truth.

Run::

    python examples/deblend_field.py --size 1024 --out field-run
    python examples/deblend_field.py --tiny          # seconds (used by the test suite)

The same as a command line: ``probdeblend deblend field-run/tiles/*.fits --out field-run/cat``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.table import vstack

from probdeblend.catalog import read_catalog
from probdeblend.detection import match_positions
from probdeblend.scene import Scene
from probdeblend.simulate import simulate_field
from probdeblend.tiles import deblend_tiles


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="field side in pixels")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--workers", type=int, default=2, help="Dask LocalCluster workers")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--num-samples", type=int, default=200, help="posterior draws per source")
    p.add_argument("--tiny", action="store_true", help="tiny field, no cluster (tests)")
    args = p.parse_args(argv)
    size = 96 if args.tiny else args.size
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        tiles_dir = out / "tiles"
        tiles_dir.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        field = simulate_field(size, seed=1)
        print(f"simulated a {size}x{size} LSST field: {len(field.truth)} galaxies "
              f"({field.truth.meta['DENSITY']:.0f} / arcmin^2) in {time.perf_counter() - t0:.0f} s")

        # cut into 2 x 2 tiles (a real survey would overlap them and de-duplicate by ownership)
        scene, h = field.to_scene(), size // 2
        wcs = scene.wcs
        paths = []
        for k, (y0, x0) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
            path = tiles_dir / f"tile{k}.fits"
            Scene(scene.image[:, y0:y0 + h, x0:x0 + h], scene.variance[:, y0:y0 + h, x0:x0 + h],
                  scene.psf, scene.bands, scene.pixel_scale, wcs=wcs[y0:y0 + h, x0:x0 + h],
                  psf_flux_fraction=scene.psf_flux_fraction).to_fits(path, overwrite=True)
            paths.append(path)

        summary = deblend_tiles(
            paths, out / "catalogs", client="serial" if args.tiny else None,
            scheduler=args.scheduler, n_workers=args.workers, format="parquet",
            num_samples=8 if args.tiny else args.num_samples, progress=not args.tiny,
        )  # fmt: skip
        summary["tile", "status", "n_sources", "seconds"].pprint()
        print(f"{len(summary)} tiles in {summary.meta['WALL']:.1f} s")

        cats = []
        for k, row in enumerate(summary):
            c = read_catalog(row["catalog"])
            y0, x0 = ((0, 0), (0, h), (h, 0), (h, h))[k]
            c["x_field"], c["y_field"] = c["x"] + x0, c["y"] + y0
            cats.append(c)
        cat = vstack(cats)
        truth = field.truth
        m = match_positions({"x": cat["x_field"], "y": cat["y_field"]},
                            np.stack([truth["x"], truth["y"]], -1), 2.0)
        ok = m >= 0
        print(f"catalogue: {len(cat)} sources; {ok.mean():.1%} of the true galaxies matched "
              f"within 2 px")
        if ok.any():
            rel = np.asarray(cat["flux_r"])[m[ok]] / np.asarray(truth["flux_r"])[ok] - 1
            inside = ((np.asarray(cat["flux_r_q16"])[m[ok]] <= np.asarray(truth["flux_r"])[ok])
                      & (np.asarray(truth["flux_r"])[ok] <= np.asarray(cat["flux_r_q84"])[m[ok]]))
            print(f"flux_r: median bias {np.median(rel):+.3f}, truth inside the 16-84% "
                  f"interval for {inside.mean():.0%}")
        cat["tile", "id", "x", "y", "ra", "dec", "flux_r", "flux_r_err", "e1", "flag_edge"][
            :5].pprint(max_width=160)


if __name__ == "__main__":
    main()
