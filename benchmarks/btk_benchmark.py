"""probdeblend vs BTK's built-in deblenders, with BlendingToolKit's own generator and metrics.

Blends: BTK's ``CatsimGenerator`` (LSST, full-depth noise) drawing probdeblend's galaxy
population written in the CatSim schema (``btk_adapter.catsim_catalog``), BTK's
``DefaultSampling`` (2-4 galaxies, within ``--max-shift`` arcsec of the centre of a 24" stamp).
Deblenders: ``ProbdeblendDeblender`` (amortized), ``SepSingleBand`` (i band), ``SepMultiBand``,
``PeakLocalMax`` (band mean). scarlet is not installed here (its wheel needs a compiler).
Metrics: BTK's ``PixelHungarianMatcher`` (``--max-sep`` px) then ``Precision``, ``Recall``,
``F1``; ``MSE``, ``PSNR``, ``StructSim`` of the matched deblended i-band images against BTK's
isolated images (deblenders that return images). Also, for probdeblend, the relative r-band flux
error of matched sources against the isolated images' sums.

Run::

    OMP_NUM_THREADS=1 python benchmarks/btk_benchmark.py --batches 8 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-shift", type=float, default=3.0)
    p.add_argument("--max-sep", type=float, default=3.0)
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/btk")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import btk  # noqa: F401
    from btk.catalog import CatsimCatalog
    from btk.deblend import PeakLocalMax, SepMultiBand, SepSingleBand
    from btk.match import PixelHungarianMatcher
    from btk.metrics.detection import F1, Precision, Recall
    from btk.metrics.reconstruction import MSE, PSNR, StructSim
    from btk.sampling_functions import DefaultSampling
    from btk.survey import get_surveys
    from surveycodex.utilities import mean_sky_level

    from probdeblend.btk_adapter import CatsimGenerator, ProbdeblendDeblender, catsim_catalog

    survey = get_surveys("LSST")
    i_band = list(survey.available_filters).index("i")
    sky_mean = float(np.mean([mean_sky_level(survey, survey.get_filter(b)).to_value("electron")
                              for b in survey.available_filters]))
    cat = CatsimCatalog(catsim_catalog(5000, seed=11))
    sampling = DefaultSampling(max_number=4, min_number=2, stamp_size=24.0,
                               max_shift=args.max_shift, seed=12)
    gen = CatsimGenerator(cat, sampling, survey, batch_size=args.batch_size, njobs=1,
                          add_noise="all", seed=13)
    deblenders = {
        "probdeblend (amortized)": ProbdeblendDeblender(6, num_samples=args.num_samples),
        "SepSingleBand (i)": SepSingleBand(20, use_band=i_band),
        "SepMultiBand": SepMultiBand(40),
        "PeakLocalMax (mean)": PeakLocalMax(20, sky_level=sky_mean / 6, use_mean=True),
    }
    matcher = PixelHungarianMatcher(pixel_max_sep=args.max_sep)
    stats = {name: {"tp": 0, "t": 0, "p": 0, "seconds": 0.0, "mse": [], "psnr": [], "ssim": [],
                    "btk": {"precision": Precision(args.batch_size),
                            "recall": Recall(args.batch_size), "f1": F1(args.batch_size)}}
             for name in deblenders}
    flux_rel = []
    r_band = list(survey.available_filters).index("r")
    for b in range(args.batches):
        batch = next(gen)
        for name, deb in deblenders.items():
            t0 = time.perf_counter()
            out = deb(batch)
            stats[name]["seconds"] += time.perf_counter() - t0
            cats = out.catalog_list
            if "x_peak" not in cats[0].colnames:  # SepMultiBand returns ra, dec only
                for c in cats:
                    x, y = batch.wcs.world_to_pixel_values(np.asarray(c["ra"]) / 3600,
                                                           np.asarray(c["dec"]) / 3600)
                    c["x_peak"], c["y_peak"] = x, y
            m = matcher(batch.catalog_list, cats)
            n_match = np.array([len(x) for x in m.true_matches])
            s = stats[name]
            for met in s["btk"].values():  # BTK's own metric objects (mean over batches)
                met(n_match, m.n_true, m.n_pred)
            s["tp"] += int(n_match.sum())
            s["t"] += int(m.n_true.sum())
            s["p"] += int(m.n_pred.sum())
            if out.deblended_images is not None:
                iso = m.match_true_arrays(batch.isolated_images)
                deb_img = m.match_pred_arrays(out.deblended_images)
                band = i_band if out.deblended_images.shape[2] > 1 else 0
                # BTK's reconstruction metrics need non-negative images of equal shape
                t_img = np.clip(iso[:, :, i_band], 0, None)
                p_img = np.clip(deb_img[:, :, band], 0, None)
                for key, metric in (("mse", MSE), ("psnr", PSNR), ("ssim", StructSim)):
                    met = metric(args.batch_size)
                    met(t_img, p_img)
                    s[key] += list(met.all_data[-1][key])
            if name.startswith("probdeblend"):
                for k in range(args.batch_size):
                    tm, pm = m.true_matches[k], m.pred_matches[k]
                    true_flux = batch.isolated_images[k, tm, r_band].sum(axis=(-1, -2))
                    got = np.asarray(cats[k]["flux_r"])[pm]
                    flux_rel += list(got / true_flux - 1)
        print(f"batch {b + 1}/{args.batches}", flush=True)
    out = args.out.resolve()
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # no machine paths
    res = {"settings": vars(args) | {"out": str(rel)}, "deblenders": {}}
    for name, s in stats.items():
        res["deblenders"][name] = {
            **{k: float(met.aggregate()) for k, met in s["btk"].items()},
            "n_true": s["t"], "n_pred": s["p"], "n_matched": s["tp"],
            "seconds_per_blend": s["seconds"] / (args.batches * args.batch_size),
            "mse": float(np.mean(s["mse"])) if s["mse"] else None,
            "psnr": float(np.mean(s["psnr"])) if s["psnr"] else None,
            "ssim": float(np.mean(s["ssim"])) if s["ssim"] else None,
        }
    fr = np.asarray(flux_rel)
    res["probdeblend_flux_r"] = {"median_rel_error": float(np.median(fr)),
                                 "mad_rel": float(1.4826 * np.median(np.abs(fr - np.median(fr)))),
                                 "n": len(fr)}
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    lines = ["# probdeblend in BlendingToolKit", "",
             f"{args.batches * args.batch_size} BTK blends (CatsimGenerator, LSST, 2-4 galaxies "
             f"within {args.max_shift}\" of the centre, 24\" stamps, probdeblend's population in "
             f"CatSim schema); BTK PixelHungarianMatcher at {args.max_sep} px; reconstruction "
             "metrics on the i band of matched sources (BTK's MSE / PSNR / StructSim).", "",
             "| deblender | precision | recall | F1 | MSE | PSNR | SSIM | s / blend |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["deblenders"].items():
        def f(v, fmt):
            return "n/a" if v is None else format(v, fmt)
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{f(r['mse'], '.3g')} | {f(r['psnr'], '.1f')} | {f(r['ssim'], '.3f')} | "
                     f"{r['seconds_per_blend']:.3f} |")
    fr = res["probdeblend_flux_r"]
    lines += ["", f"probdeblend r-band flux of matched sources vs the isolated images: median "
                  f"relative error {fr['median_rel_error']:+.3f}, robust scatter "
                  f"{fr['mad_rel']:.3f} (n = {fr['n']}).", "",
              "SepSingleBand returns segmentation-masked single-band images; PeakLocalMax and "
              "SepMultiBand return no images. scarlet was not installed (needs a compiler). "
              "Timings on 2 shared CPU cores.", "", "Command:", "",
              f"    OMP_NUM_THREADS=1 python benchmarks/btk_benchmark.py --batches "
              f"{args.batches} --batch-size {args.batch_size}", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
