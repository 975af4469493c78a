"""Simulate isolated and blended galaxies, make the figures of docs/simulation.md, time it.

Usage::

    python examples/simulate_blends.py              # figures into docs/images/
    python examples/simulate_blends.py --tiny --out /tmp/figs   # quick smoke run

Figures written to ``--out``:

* ``isolated_galaxies.png``: model-frame isolated galaxies (LSST ugrizy, 48x48 at 0.2",
  Gaussian PSF of 0.4" FWHM) as i/r/g colour composites of the AB flux densities;
* ``blend_scene_1.png``, ``blend_scene_2.png``: two blended 80x80 LSST scenes with the survey
  PSFs (:func:`probdeblend.plotting.plot_blend`);
* ``population.png``: histograms of the population (r magnitude, redshift, half-light radius,
  intrinsic ``|g|``, u - r colour).

It also prints the simulation throughput (items per second, one process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from probdeblend import get_survey
from probdeblend.plotting import plot_blend, rgb_composite
from probdeblend.simulate import (
    BlendConfig,
    Frame,
    GalaxyPopulation,
    blend_scene,
    isolated_stamps,
)

plt.switch_backend("Agg")  # files only, no display needed

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
MODEL_FRAME = Frame(survey="lsst", stamp_size=48, psf_fwhm=0.4)
SURVEY_FRAME = Frame(survey="lsst", stamp_size=48)
BLEND = BlendConfig(frame=Frame(survey="lsst", stamp_size=80))


def isolated_grid(out: Path, n: int = 6, seed: int = 0) -> Path:
    """Colour composites of ``n`` isolated model-frame galaxies, brightest first."""
    res = isolated_stamps(3 * n, MODEL_FRAME, seed=seed)
    truth = res["truth"]
    order = np.argsort(truth["mag"])[:n]  # the brightest of 3n draws: visible structure
    bands = MODEL_FRAME.band_names
    # electrons -> AB flux density units (f_nu), so that colours do not reflect exposure times
    survey = MODEL_FRAME.survey_obj
    to_fnu = np.array([1.0 / b.mag_to_flux(0.0) for b in survey])[:, None, None]
    ncol = 3
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.4 * ncol, 2.95 * nrow), squeeze=False)
    for ax, i in zip(axes.flat, order, strict=False):
        ax.imshow(rgb_composite(res["noiseless"][i] * to_fnu, bands), origin="lower")
        ax.set_title(f"r={truth['mag'][i]:.1f} z={truth['z'][i]:.2f}\n"
                     f"hlr={truth['hlr'][i]:.2f}\" B/T={truth['bulge_frac'][i]:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("isolated galaxies, model frame (48x48 @ 0.2\", PSF 0.4\"), irg f_nu",
                 fontsize=9)
    fig.tight_layout()
    path = out / "isolated_galaxies.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def blend_figures(out: Path, n: int = 2, max_tries: int = 40) -> list[Path]:
    """``plot_blend`` of the first ``n`` seeds whose target is visibly blended."""
    paths, seed = [], 0
    while len(paths) < n and seed < max_tries:
        sim = blend_scene(BLEND, seed=seed)
        if sim.truth["blendedness_total"][0] > 0.05 or seed == max_tries - 1:
            path = out / f"blend_scene_{len(paths) + 1}.png"
            plot_blend(sim, path=path)
            paths.append(path)
        seed += 1
    return paths


def population_histograms(out: Path, n: int, seed: int = 0) -> Path:
    """Histograms of the galaxy population's main properties."""
    survey = get_survey("lsst")
    cat = GalaxyPopulation().sample(n, survey, np.random.default_rng(seed))
    u_r = survey.band("u").flux_to_mag(cat["flux_u"]) - cat["mag"]
    panels = [
        (cat["mag"], "r magnitude (AB)"),
        (cat["z"], "redshift z"),
        (cat["hlr"], "half-light radius [arcsec]"),
        (np.hypot(cat["g1_int"], cat["g2_int"]), "intrinsic |g|"),
        (u_r, "u - r (AB)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.7))
    for ax, (values, label) in zip(axes, panels, strict=True):
        ax.hist(np.asarray(values), bins=40, color="0.3", histtype="stepfilled")
        ax.set_xlabel(label)
        ax.set_yticks([])
    axes[0].set_ylabel(f"N ({n} galaxies)")
    fig.tight_layout()
    path = out / "population.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def throughput(n_stamps: int, n_scenes: int) -> dict[str, float]:
    """Items per second (one process) for the three kinds of simulation."""
    isolated_stamps(2, SURVEY_FRAME, seed=99)  # warm caches (colour tables, bandpasses)
    blend_scene(BLEND, seed=99)
    rates = {}
    t0 = time.perf_counter()
    isolated_stamps(n_stamps, SURVEY_FRAME, seed=1, noise=True)
    rates["isolated 6x48x48, survey PSFs [stamps/s]"] = n_stamps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    isolated_stamps(n_stamps, MODEL_FRAME, seed=1, noise=True)
    rates["isolated 6x48x48, model frame [stamps/s]"] = n_stamps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in range(n_scenes):
        blend_scene(BLEND, seed=s)
    rates["blended 6x80x80, 2-4 galaxies [scenes/s]"] = n_scenes / (time.perf_counter() - t0)
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory for the PNGs")
    p.add_argument("--tiny", action="store_true", help="small sizes, for tests")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n_pop, n_stamps, n_scenes = (500, 20, 5) if args.tiny else (5000, 200, 50)

    paths = [isolated_grid(out)]
    paths += blend_figures(out)
    paths.append(population_histograms(out, n_pop))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
    print(f"throughput (1 process, {n_stamps} stamps / {n_scenes} scenes):")
    for name, rate in throughput(n_stamps, n_scenes).items():
        print(f"  {name:45s} {rate:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
