"""Survey-scale benchmark: simulated LSST fields -> catalogues (detection, speed, memory, Dask).

Steps (each stores its numbers in ``<out>/results.json`` and is skipped when already there;
``--report-only`` rebuilds ``<out>/report.md`` and the figures from that file):

``simulate``   LSST ugrizy fields of 512^2 ... 4096^2 pixels (``simulate_field``, LSST
               Science Book number counts), cached as FITS in ``--cache``.
``timing``     ``probdeblend.deblend`` (amortized, ``--num-samples`` draws per source) on each
               field, each in a fresh Python process: wall time, sources/s, peak RSS.
``detection``  recall (vs SNR and blendedness) and purity on the 2048^2 field, matched to truth
               within 2 px, for ``detect_sources`` and the sep baseline ``detect``; the target
               found (within 2 px) in 80x80 blends of 2-4 galaxies (``blend_scene``).
``accuracy``   the 2048^2 catalogue against the truth: flux bias, 16-84% coverage.
``dask``       4 tiles (the quadrants of the 2048^2 field) on a LocalCluster with 1 and with 2
               worker processes: wall times, identical catalogues.

Run (2 shared CPU cores here; the long part runs in the background)::

    OMP_NUM_THREADS=1 nohup python benchmarks/field_benchmark.py > runs/field.log 2>&1 &
    python benchmarks/field_benchmark.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = (512, 1024, 2048, 4096)
SNR_BINS = (10, 20, 50, 100, 1e9)
#: earlier timings kept in results.json (key -> what changed since), newest first
BEFORE = {
    "timing_ab00267": "Before the kept residual candidates reused the confirmation's q and "
                      "templates (code ab00267, the same session)",
    "timing_77eaff9": "Before residual-pass candidates needed the photometry's confirmation "
                      "(`residual_min_snr`; code 77eaff9, the same session)",
    "timing_acccd58": "The previous run (code acccd58, before the blendedness-dependent flux "
                      "error model and the catalogue's blendedness / chi2 columns; an A/B of "
                      "the two codes on the 2048^2 field, alternating fresh processes, gave "
                      "inference 1.45 / 1.31 s (acccd58) against 1.44 / 1.47 s: the same "
                      "within this VM's run-to-run scatter of 10-30 %)",
    "timing_before_one_render": "Before each source was decoded and rendered once per call "
                                "(the residual pass's templates feed the photometry), the "
                                "catalogue's boxes shrank to 72 px and its groups to their "
                                "templates' support, the catalogue stopped drawing latents "
                                "and detection's peak splitting became O(n log n) "
                                "(2026-11-28; load average 1.6-2.1 then; on the idle "
                                "machine that code ran the 1024^2 and 2048^2 fields at 297 "
                                "and 249 sources/s, best of 2 runs in one process)",
    "timing_before_cutouts": "Before the encoder's cutouts stopped padding a copy of the image "
                             "for every call (the same cutouts, to float32 rounding of the "
                             "noise level)",
}
BLEND_BINS = (0.0, 0.05, 0.2, 0.5, 1.01)


def _load(out: Path) -> dict:
    p = out / "results.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save(out: Path, res: dict) -> None:
    from probdeblend.atomic import write_json

    write_json(res, out / "results.json", overwrite=True)


def _field_path(cache: Path, size: int) -> Path:
    return cache / f"field_{size}.fits"


# ------------------------------------------------------------------------------------- steps
def step_simulate(args, res):
    from probdeblend.simulate import simulate_field

    sim = res.setdefault("simulate", {})
    for size in args.sizes:
        path = _field_path(args.cache, size)
        if path.exists() and str(size) in sim:
            continue
        t0 = time.perf_counter()
        field = simulate_field(size, seed=size)
        dt = time.perf_counter() - t0
        field.to_fits(path, overwrite=True)
        sim[str(size)] = {"n_galaxies": len(field.truth), "seconds": round(dt, 1),
                          "density_arcmin2": field.truth.meta["DENSITY"],
                          "area_arcmin2": field.truth.meta["AREA"]}
        print(f"simulated {size}^2: {len(field.truth)} galaxies in {dt:.0f} s", flush=True)
        _save(args.out, res)


def _hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_field(path: str, num_samples: int, catalog: str | None) -> dict:
    """Deblend one field in this process (called in a subprocess by ``step_timing``)."""
    import torch

    torch.set_num_threads(int(os.environ.get("PB_THREADS", "2")))
    from astropy.table import Table

    from probdeblend.deblend import _encoder, _resolve_prior, deblend
    from probdeblend.scene import Scene

    scene = Scene.from_fits(path)  # the field file is a Scene file (+ a TRUTH table)
    n_truth = len(Table.read(path, hdu="TRUTH"))
    prior = _resolve_prior("lsst-vae")
    _encoder(prior)
    import scipy.signal  # noqa: F401 - one-off import (~1 s) not counted in the timing

    rss0 = _hwm_mb()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cat = deblend(scene, num_samples=num_samples, seed=0)
    wall = time.perf_counter() - t0
    rss1 = _hwm_mb()
    # the same call again in this process: without the one-off costs of a first call
    # (library set-up, first passes of each batch shape), i.e. a survey worker's steady state
    t0 = time.perf_counter()
    deblend(scene, num_samples=num_samples, seed=0)
    wall_warm = time.perf_counter() - t0
    if catalog:
        from probdeblend.catalog import write_catalog

        write_catalog(cat, catalog, overwrite=True)
    return {"n_sources": len(cat), "n_truth": n_truth, "wall_s": round(wall, 2),
            "sources_per_s": round(len(cat) / wall, 1), "wall_warm_s": round(wall_warm, 2),
            "sources_per_s_warm": round(len(cat) / wall_warm, 1),
            "t_detect": cat.meta["T_DETECT"], "t_group": cat.meta["T_GROUP"],
            "t_infer": cat.meta["T_INFER"], "n_groups": cat.meta["NGROUPS"],
            "max_group": cat.meta["MAXGROUP"], "rss_before_mb": round(rss0),
            "peak_rss_mb": round(rss1), "image_mb": round(scene.image.nbytes / 2**20),
            "torch_threads": torch.get_num_threads(), "num_samples": num_samples,
            "load_avg_1min": round(load, 2)}


def step_timing(args, res):
    tim = res.setdefault("timing", {})
    for size in args.sizes:
        if str(size) in tim:
            continue
        cat = args.cache / f"catalog_{size}.fits"
        cmd = [sys.executable, __file__, "--one", str(_field_path(args.cache, size)),
               "--num-samples", str(args.num_samples), "--catalog", str(cat)]
        rows = []
        for _ in range(max(int(args.repeats), 1)):  # fresh processes; the median run is kept
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = sorted(rows, key=lambda r: r["wall_s"])[(len(rows) - 1) // 2]
        row["wall_s_runs"] = [r["wall_s"] for r in rows]
        tim[str(size)] = row
        print(f"deblend {size}^2: {row}", flush=True)
        _save(args.out, res)


def _match(cat_xy, truth_xy, tol=2.0):
    from astropy.table import Table

    from probdeblend.detection import match_positions

    t = Table({"x": cat_xy[:, 0], "y": cat_xy[:, 1]})
    return match_positions(t, truth_xy, tol)


def _recall_table(m, truth, n_det):
    snr = np.asarray(truth["snr"])
    bl = np.nan_to_num(np.asarray(truth["blendedness"]), nan=0.0)
    out = {"recall_all": float(np.mean(m >= 0)),
           "recall_snr10": float(np.mean(m[snr > 10] >= 0)),
           "purity": float(len(np.unique(m[m >= 0])) / max(n_det, 1)), "n_det": int(n_det),
           "n_truth": len(truth), "by_snr": [], "by_blendedness": []}
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:], strict=True):
        sel = (snr > lo) & (snr <= hi)
        out["by_snr"].append([lo, hi, int(sel.sum()), float(np.mean(m[sel] >= 0))
                              if sel.any() else None])
    for lo, hi in zip(BLEND_BINS[:-1], BLEND_BINS[1:], strict=True):
        sel = (bl >= lo) & (bl < hi) & (snr > 10)
        out["by_blendedness"].append([lo, hi, int(sel.sum()), float(np.mean(m[sel] >= 0))
                                      if sel.any() else None])
    return out


def step_detection(args, res):
    if "detection" in res:
        return
    from probdeblend.detection import detect, detect_sources, match_positions
    from probdeblend.simulate import BlendConfig, SimulatedField, blend_scene

    size = 2048 if 2048 in args.sizes else max(args.sizes)
    field = SimulatedField.from_fits(_field_path(args.cache, size))
    scene = field.to_scene()
    truth = field.truth
    txy = np.stack([truth["x"], truth["y"]], -1)
    det = {}
    for name, fn in (("detect_sources", detect_sources), ("sep detect", detect)):
        t0 = time.perf_counter()
        tab = fn(scene)
        dt = time.perf_counter() - t0
        m = match_positions(tab, txy, 2.0)
        det[name] = _recall_table(m, truth, len(tab))
        det[name]["seconds"] = round(dt, 2)
    # the full pipeline: detect_sources + the residual pass of deblend (catalogue of `timing`)
    from probdeblend.catalog import read_catalog
    from probdeblend.deblend import deblend

    cpath = args.cache / f"catalog_{size}.fits"
    if cpath.exists():
        cat = read_catalog(cpath)
        xy = np.stack([cat["x_init"], cat["y_init"]], -1)
        m = _match(xy, txy)
        det["deblend (+ residual pass)"] = _recall_table(m, truth, len(cat))
        det["deblend (+ residual pass)"]["seconds"] = res.get("timing", {}).get(
            str(size), {}).get("t_detect", float("nan"))

    def pipeline(s):
        c = deblend(s, num_samples=16, seed=0)
        return {"x": c["x_init"], "y": c["y_init"]}

    found = {"detect_sources": 0, "sep detect": 0, "deblend (+ residual pass)": 0}
    for i in range(args.blends):
        b = blend_scene(BlendConfig(), seed=50_000 + i)
        s = b.to_scene(with_positions=False)
        t = np.stack([b.truth["x"], b.truth["y"]], -1)
        for name, fn in (("detect_sources", detect_sources), ("sep detect", detect),
                         ("deblend (+ residual pass)", pipeline)):
            found[name] += int(match_positions(fn(s), t, 2.0)[0] >= 0)
    res["detection"] = {"field_size": size, "field": det,
                        "blends": {"n": args.blends,
                                   **{k: v / args.blends for k, v in found.items()}}}
    print("detection:", json.dumps(res["detection"])[:400], flush=True)
    _save(args.out, res)


def step_accuracy(args, res):
    if "accuracy" in res:
        return
    from probdeblend.catalog import read_catalog
    from probdeblend.simulate import SimulatedField

    size = 2048 if 2048 in args.sizes else max(args.sizes)
    cat = read_catalog(args.cache / f"catalog_{size}.fits")
    truth = SimulatedField.from_fits(_field_path(args.cache, size)).truth
    m = _match(np.stack([cat["x"], cat["y"]], -1), np.stack([truth["x"], truth["y"]], -1))
    ok = m >= 0
    row = {}
    for b in ("g", "r", "i"):
        f_true = np.asarray(truth[f"flux_{b}"])[ok]
        c = cat[m[ok]]
        rel = np.asarray(c[f"flux_{b}"]) / f_true - 1
        inside = (np.asarray(c[f"flux_{b}_q16"]) <= f_true) & (f_true <= np.asarray(
            c[f"flux_{b}_q84"]))
        single = np.asarray(c["group_size"]) == 1
        row[b] = {"median_rel_bias": float(np.median(rel)),
                  "mad_rel": float(1.4826 * np.median(np.abs(rel - np.median(rel)))),
                  "coverage_68": float(np.mean(inside)),
                  "coverage_68_single": float(np.mean(inside[single])),
                  "coverage_68_grouped": float(np.mean(inside[~single])),
                  "median_rel_err": float(np.median(np.asarray(c[f"flux_{b}_err"])
                                                    / np.asarray(c[f"flux_{b}"])))}
    c = cat[m[ok]]
    de = np.asarray(c["e1"]) - np.asarray(truth["g1"])[ok]
    row["e1_resid_std"] = float(np.nanstd(de))
    row["pos_resid_rms"] = float(np.sqrt(np.mean(
        (np.asarray(c["x"]) - np.asarray(truth["x"])[ok]) ** 2
        + (np.asarray(c["y"]) - np.asarray(truth["y"])[ok]) ** 2)))
    row["median_pos_err"] = float(np.median(c["pos_err"]))
    row["n_matched"] = int(ok.sum())
    res["accuracy"] = row
    print("accuracy:", row, flush=True)
    _save(args.out, res)


def step_dask(args, res):
    if "dask" in res:
        return
    from probdeblend.catalog import read_catalog
    from probdeblend.scene import Scene
    from probdeblend.tiles import catalog_path, deblend_tiles

    size = 2048 if 2048 in args.sizes else max(args.sizes)
    scene = Scene.from_fits(_field_path(args.cache, size))
    h = size // 2
    tile_dir = args.cache / "tiles"
    tile_dir.mkdir(exist_ok=True)
    paths = []
    wcs = scene.wcs
    for k, (y0, x0) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
        p = tile_dir / f"q{k}.fits"
        if not p.exists():
            Scene(scene.image[:, y0:y0 + h, x0:x0 + h], scene.variance[:, y0:y0 + h, x0:x0 + h],
                  scene.psf, scene.bands, scene.pixel_scale,
                  wcs=wcs[y0:y0 + h, x0:x0 + h]).to_fits(p)
        paths.append(str(p))
    out = {}
    from dask.distributed import Client, LocalCluster

    def warm():  # import torch / probdeblend and load the encoder in each worker
        from probdeblend.deblend import _encoder, _resolve_prior

        _encoder(_resolve_prior("lsst-vae"))
        return os.getpid()

    for n_workers in (1, 2):
        d = args.cache / f"dask_{n_workers}w"
        if d.exists():
            import shutil

            shutil.rmtree(d)
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        client.run(warm)
        startup = time.perf_counter() - t0
        try:
            s = deblend_tiles(paths, d, client=client, threads_per_worker=1,
                              num_samples=args.num_samples, progress=False)
        finally:
            client.close()
            cluster.close()
        out[f"{n_workers}_workers"] = {"wall_s": s.meta["WALL"],
                                       "startup_s": round(startup, 1),
                                       "task_s": [float(x) for x in s["seconds"]],
                                       "status": list(map(str, s["status"])),
                                       "n_sources": [int(x) for x in s["n_sources"]]}
        print(f"dask {n_workers} workers: {s.meta['WALL']} s", flush=True)
    same = True
    for k in range(4):
        a = read_catalog(catalog_path(args.cache / "dask_1w", f"q{k}"))
        b = read_catalog(catalog_path(args.cache / "dask_2w", f"q{k}"))
        same &= all(np.array_equal(np.asarray(a[c]), np.asarray(b[c]),
                                   equal_nan=a[c].dtype.kind == "f") for c in a.colnames)
    out["identical_catalogs"] = bool(same)
    out["wall_ratio_1_over_2"] = out["1_workers"]["wall_s"] / out["2_workers"]["wall_s"]
    out["tile_size"] = h
    res["dask"] = out
    _save(args.out, res)


# ------------------------------------------------------------------------------------ report
def figures(args, res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.out
    # scaling
    tim = res.get("timing", {})
    if tim:
        sizes = sorted(int(k) for k in tim)
        n = np.array([tim[str(s)]["n_sources"] for s in sizes])
        w = np.array([tim[str(s)]["wall_s"] for s in sizes])
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        ax[0].loglog(n, w, "o-", label="deblend (amortized)")
        ax[0].loglog(n, w[-1] * n / n[-1], "k:", label="linear in sources")
        for s, xx, yy in zip(sizes, n, w, strict=True):
            ax[0].annotate(f"{s}$^2$", (xx, yy), textcoords="offset points", xytext=(4, -10))
        ax[0].set_xlabel("sources")
        ax[0].set_ylabel("wall time [s]")
        ax[0].legend()
        ax[1].plot(sizes, [tim[str(s)]["peak_rss_mb"] for s in sizes], "o-", label="peak RSS")
        ax[1].plot(sizes, [tim[str(s)]["rss_before_mb"] for s in sizes], "s--",
                   label="after loading scene + model")
        ax[1].set_xlabel("field side [px]")
        ax[1].set_ylabel("MB")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
    det = res.get("detection")
    if det:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        for name, st in (("detect_sources", "o-"), ("sep detect", "s--"),
                         ("deblend (+ residual pass)", "^-")):
            if name not in det["field"]:
                continue
            d = det["field"][name]
            xs = [np.sqrt(lo * min(hi, 300)) for lo, hi, _, _ in d["by_snr"]]
            ax[0].semilogx(xs, [r for *_, r in d["by_snr"]], st, label=name)
            xb = [(lo + min(hi, 1)) / 2 for lo, hi, _, _ in d["by_blendedness"]]
            ax[1].plot(xb, [r for *_, r in d["by_blendedness"]], st, label=name)
        ax[0].set_xlabel("true SNR (r), bins 10-20-50-100-inf")
        ax[0].set_ylabel("recall (2 px)")
        ax[0].set_xticks([14, 32, 71, 173])
        ax[0].set_xticklabels(["10-20", "20-50", "50-100", ">100"])
        ax[0].minorticks_off()
        ax[1].set_xlabel("blendedness (SNR > 10)")
        for a in ax:
            a.axhline(0.95, color="k", lw=0.5)
            a.set_ylim(0, 1.02)
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "detection.png", dpi=110)
        plt.close(fig)
    dk = res.get("dask")
    if dk:
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.bar(["1 worker", "2 workers"], [dk["1_workers"]["wall_s"], dk["2_workers"]["wall_s"]])
        ax.set_ylabel("wall time [s], 4 tiles")
        ax.set_title(f"ratio {dk['wall_ratio_1_over_2']:.2f}, identical: "
                     f"{dk['identical_catalogs']}")
        fig.tight_layout()
        fig.savefig(out / "dask.png", dpi=110)
        plt.close(fig)
    field_figure(args, res)


def field_figure(args, res):
    import matplotlib.pyplot as plt

    from probdeblend.catalog import read_catalog
    from probdeblend.simulate import SimulatedField

    size = 2048 if 2048 in args.sizes else max(args.sizes)
    cpath = args.cache / f"catalog_{size}.fits"
    fpath = _field_path(args.cache, size)
    if not (cpath.exists() and fpath.exists()):
        return
    field = SimulatedField.from_fits(fpath)
    cat = read_catalog(cpath)
    truth = field.truth
    n = 384
    img = field.image[3, :n, :n]
    sig = np.sqrt(np.median(field.variance[3]))
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.3))
    ax[0].imshow(np.arcsinh(img / (3 * sig)), origin="lower", cmap="gray_r")
    sel_t = (truth["x"] < n) & (truth["y"] < n)
    sel_c = (cat["x"] < n) & (cat["y"] < n)
    ax[0].plot(truth["x"][sel_t], truth["y"][sel_t], "x", color="tab:blue", ms=5, label="truth")
    ax[0].plot(cat["x"][sel_c], cat["y"][sel_c], "o", mfc="none", color="tab:red", ms=7,
               label="catalogue")
    ax[0].set_title(f"i band, {n}x{n} corner of the {size}$^2$ field")
    ax[0].legend(loc="upper right", fontsize=8)
    m = _match(np.stack([cat["x"], cat["y"]], -1), np.stack([truth["x"], truth["y"]], -1))
    ok = m >= 0
    c = cat[m[ok]]
    snr = np.asarray(truth["snr"])[ok]
    ax[1].loglog(snr, np.asarray(c["flux_r_err"]) / np.asarray(c["flux_r"]), ".", ms=3,
                 label="posterior width / mean")
    rel = np.abs(np.asarray(c["flux_r"]) / np.asarray(truth["flux_r"])[ok] - 1)
    ax[1].loglog(snr, rel, ".", ms=2, alpha=0.4, label="|error| vs truth")
    ax[1].loglog([10, 1e3], [1 / 10, 1 / 1e3], "k:", label="1/SNR")
    ax[1].set_xlabel("true SNR (r)")
    ax[1].set_ylabel("relative flux_r")
    ax[1].legend(fontsize=8)
    ax[2].scatter(np.asarray(truth["g1"])[ok], np.asarray(c["e1"]), s=3,
                  c=np.clip(np.nan_to_num(np.asarray(truth["blendedness"])[ok]), 0, 1),
                  cmap="viridis")
    ax[2].plot([-0.7, 0.7], [-0.7, 0.7], "k:")
    ax[2].set_xlabel("true g1")
    ax[2].set_ylabel("catalogue e1 (q-mean shape; colour: blendedness)")
    ax[2].set_title("e draws: placeholder (zero width)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "field.png", dpi=110)
    plt.close(fig)


def report(args, res):
    lines = ["# Field benchmark (survey scale)", "",
             "Produced by `benchmarks/field_benchmark.py`; numbers in `results.json`. Machine: "
             "2 CPU cores shared with other jobs (timings are upper bounds).", ""]
    sim = res.get("simulate", {})
    tim = res.get("timing", {})
    if tim:
        lines += ["## Whole field -> catalogue (amortized, "
                  f"{next(iter(tim.values()))['num_samples']} draws per source)", "",
                  "| field | galaxies (truth) | sources | wall [s] (median run) | detect [s] | "
                  "infer [s] | "
                  "sources/s | sources/s, second call | groups | largest group | "
                  "peak RSS [MB] | RSS before [MB] | image [MB] | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in sorted(tim, key=int):
            r = tim[s]
            runs = r.get("wall_s_runs", [r["wall_s"]])
            wall = f"{r['wall_s']}" + (f" ({min(runs)}-{max(runs)}, {len(runs)} runs)"
                                       if len(runs) > 1 else "")
            lines.append(f"| {s}^2 | {r['n_truth']} | {r['n_sources']} | {wall} | "
                         f"{r['t_detect']} | {r['t_infer']} | {r['sources_per_s']} | "
                         f"{r.get('sources_per_s_warm', 'n/a')} | "
                         f"{r['n_groups']} | {r['max_group']} | {r['peak_rss_mb']} | "
                         f"{r['rss_before_mb']} | {r['image_mb']} | "
                         f"{r.get('load_avg_1min', 'n/a')} |")
        lines += ["", "Each run is a fresh process: `sources/s` includes a first call's "
                      "one-off costs; `second call` repeats the call in that process (a "
                      "survey worker's steady state). Peak RSS is of the first call."]
        for key, what in BEFORE.items():
            before = res.get(key) or {}
            if before:
                lines += ["", what + ": " + ", ".join(
                    f"{s}^2 {before[s]['sources_per_s']}" for s in sorted(before, key=int)
                    if "sources_per_s" in before[s]) + " sources/s."]
        lines += ["", "![scaling](scaling.png)", ""]
    if sim:
        lines += ["Simulation (not part of the timing): " + ", ".join(
            f"{s}^2: {v['n_galaxies']} galaxies in {v['seconds']} s" for s, v in sim.items())
            + f"; density {next(iter(sim.values()))['density_arcmin2']:.1f} / arcmin^2 "
              "(LSST Science Book eq. 3.7).", ""]
    det = res.get("detection")
    if det:
        lines += [f"## Detection ({det['field_size']}^2 field, matched within 2 px)", "",
                  "| detector | recall (all) | recall SNR>10 | purity | detections | time [s] |",
                  "|---|---|---|---|---|---|"]
        old = ((res.get("detection_acccd58") or {}).get("field") or {}).get(
            "deblend (+ residual pass)")
        shown = {**det["field"], **({"deblend, residual candidates unconfirmed (acccd58)": old}
                                    if old else {})}
        for name, d in shown.items():
            lines.append(f"| {name} | {d['recall_all']:.3f} | {d['recall_snr10']:.3f} | "
                         f"{d['purity']:.3f} | {d['n_det']} / {d['n_truth']} truth | "
                         f"{d['seconds']} |")
        names = list(det["field"])

        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"

        lines += ["", "Recall by true SNR (r band):", "",
                  "| SNR | n | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        rows = [det["field"][k]["by_snr"] for k in names]
        for cells in zip(*rows, strict=True):
            lo, hi = cells[0][0], cells[0][1]
            hi = "inf" if hi > 1e6 else f"{hi:g}"
            lines.append(f"| {lo:g}-{hi} | {cells[0][2]} | "
                         + " | ".join(fmt(c[3]) for c in cells) + " |")
        lines += ["", "Recall by blendedness (SNR > 10):", "",
                  "| blendedness | n | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        rows = [det["field"][k]["by_blendedness"] for k in names]
        for cells in zip(*rows, strict=True):
            lines.append(f"| {cells[0][0]:g}-{min(cells[0][1], 1):g} | {cells[0][2]} | "
                         + " | ".join(fmt(c[3]) for c in cells) + " |")
        bl = det["blends"]
        lines += ["", f"80x80 blends of 2-4 galaxies (`blend_scene`, {bl['n']} scenes): target "
                      "found within 2 px: " + ", ".join(
                          f"{k} {v:.3f}" for k, v in bl.items() if k != "n") + ".", "",
                  "![detection](detection.png)", ""]
    acc = res.get("accuracy")
    if acc:
        lines += ["## Catalogue vs truth (2048^2, matched sources)", "",
                  "Fluxes: `photometry` is the catalogue's default (closed-form flux posterior "
                  "given q's mean morphology, solved per blend group, calibrated systematic); "
                  "`q` rows (where kept) are q's own log-normal fluxes: the catalogue before "
                  "that change, run with the encoder shipped then (v0.2, no shape head), so "
                  "they compare the catalogue as it was, not the two flux methods on one "
                  "encoder.", "",
                  "`photometry, acccd58`: the same before the blendedness-dependent flux error "
                  "model (2026-11-28; one fractional systematic for every source).", "",
                  "| band | fluxes | median flux bias | robust scatter | median posterior rel. "
                  "width | truth inside 16-84% (singles / grouped) |", "|---|---|---|---|---|---|"]
        before = res.get("accuracy_q_fluxes") or {}
        for b in ("g", "r", "i"):
            for label, a in (("photometry", acc),
                             ("photometry, acccd58", res.get("accuracy_acccd58") or {}),
                             ("q", before)):
                if b not in a:
                    continue
                r = a[b]
                split = (f" ({r['coverage_68_single']:.3f} / {r['coverage_68_grouped']:.3f})"
                         if "coverage_68_single" in r else "")
                lines.append(f"| {b} | {label} | {r['median_rel_bias']:+.3f} | "
                             f"{r['mad_rel']:.3f} | {r['median_rel_err']:.3f} | "
                             f"{r['coverage_68']:.3f}{split} |")
        lines += ["", f"{acc['n_matched']} matched; e1 - g1 std {acc['e1_resid_std']:.3f}; "
                      f"position rms {acc['pos_resid_rms']:.2f} px "
                      f"(median posterior pos_err {acc['median_pos_err']:.2f} px).", "",
                  "![field](field.png)", ""]
    dk = res.get("dask")
    if dk:
        lines += [f"## Dask: 4 tiles of {dk['tile_size']}^2 on a LocalCluster", "",
                  "| workers | wall [s] (tiles) | cluster start + warm-up [s] | "
                  "per-tile task [s] |",
                  "|---|---|---|---|"]
        for k in ("1_workers", "2_workers"):
            lines.append(f"| {k[0]} | {dk[k]['wall_s']} | {dk[k].get('startup_s', 'n/a')} | "
                         f"{', '.join(f'{x:.1f}' for x in dk[k]['task_s'])} |")
        lines += ["", f"Wall-time ratio 1 worker / 2 workers: {dk['wall_ratio_1_over_2']:.2f}; "
                      f"catalogues identical: {dk['identical_catalogs']}.", "",
                  "![dask](dask.png)", ""]
    lines += ["## Commands", "", "    OMP_NUM_THREADS=1 nohup python benchmarks/field_benchmark.py"
              " > runs/field.log 2>&1 &", "    python benchmarks/field_benchmark.py "
              "--report-only", ""]
    (args.out / "report.md").write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3,
                   help="timing: runs per field (fresh processes); the median run is reported")
    p.add_argument("--blends", type=int, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/field")
    p.add_argument("--cache", type=Path, default=ROOT / "runs/field_cache")
    p.add_argument("--steps", nargs="+",
                   default=["simulate", "timing", "detection", "accuracy", "dask"])
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--catalog", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_field(args.one, args.num_samples, args.catalog)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    res = _load(args.out)
    if not args.report_only:
        steps = {"simulate": step_simulate, "timing": step_timing,
                 "detection": step_detection, "accuracy": step_accuracy, "dask": step_dask}
        for name in args.steps:
            t0 = time.perf_counter()
            steps[name](args, res)
            print(f"step {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    figures(args, res)
    report(args, res)


if __name__ == "__main__":
    main()
