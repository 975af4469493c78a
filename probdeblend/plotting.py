"""Figures: colour composites of multi-band images and blended-scene overviews.

All functions take (band, y, x) arrays in electrons per pixel and draw with
``origin="lower"`` so that pixel (x, y) sits at plot coordinates (x, y) (see
:doc:`/conventions`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["rgb_composite", "plot_blend"]


def rgb_composite(image: np.ndarray, bands, rgb=("i", "r", "g"), stretch: float | None = None,
                  q: float = 8.0) -> np.ndarray:
    """Lupton et al. (2004) asinh colour composite of a (band, y, x) image.

    Parameters
    ----------
    image : array (band, y, x)
    bands : sequence of str
        Band names of the image's first axis.
    rgb : 3 band names
        Bands shown as red, green, blue. Missing names fall back to the reddest/middle/bluest.
    stretch : float, optional
        Linear stretch in image units (default: the 99.5th percentile of the summed image / q).
    q : float
        asinh softening.

    Returns
    -------
    float array (y, x, 3) in [0, 1].
    """
    bands = list(bands)
    idx = [bands.index(b) if b in bands else [len(bands) - 1, len(bands) // 2, 0][k]
           for k, b in enumerate(rgb)]
    chans = np.stack([np.asarray(image[i], dtype=float) for i in idx], -1)
    total = chans.mean(-1)
    if stretch is None:
        stretch = max(np.percentile(total, 99.5) / q, 1e-12)
    f = np.arcsinh(q * np.clip(total, 0, None) / (q * stretch)) / q
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(total > 0, f / total, 0.0)
    out = chans * scale[..., None]
    mx = out.max(-1, keepdims=True)
    out = out / np.maximum(mx, 1.0)
    return np.clip(out, 0, 1)


def plot_blend(sim, path=None, rgb=("i", "r", "g")):
    """Overview of a :class:`probdeblend.simulate.SimulatedScene`.

    Top row: noisy colour composite with true positions (target = star), noiseless composite,
    r-band (or middle band) noisy image. Bottom row: each galaxy's noiseless colour image
    (up to 4), labelled with its r magnitude, SNR and, for the target, blendedness.

    Returns the matplotlib Figure; writes it to ``path`` if given.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    bands = list(sim.bands)
    t = sim.truth
    n_gal = len(t)
    ncol = max(3, min(n_gal, 4))
    fig, axes = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.6), squeeze=False)
    stretch = max(np.percentile(sim.noiseless.sum(0).mean(0), 99.5) / 8.0, 1e-12)
    mid = bands.index("r") if "r" in bands else len(bands) // 2
    axes[0, 0].imshow(rgb_composite(sim.image, bands, rgb, stretch), origin="lower")
    axes[0, 0].set_title("observed (noisy) " + "".join(rgb))
    axes[0, 1].imshow(rgb_composite(sim.noiseless.sum(0), bands, rgb, stretch), origin="lower")
    axes[0, 1].set_title("noiseless")
    im = axes[0, 2].imshow(sim.image[mid], origin="lower", cmap="gray_r")
    axes[0, 2].set_title(f"{bands[mid]} band [e-/pix]")
    fig.colorbar(im, ax=axes[0, 2], fraction=0.046)
    for ax in axes[0, :2]:
        ax.scatter(t["x"][1:], t["y"][1:], marker="o", facecolors="none", edgecolors="w", s=60)
        ax.scatter(t["x"][:1], t["y"][:1], marker="*", color="yellow", s=80)
    for ax in axes[0, 3:]:
        ax.axis("off")
    for k in range(ncol):
        ax = axes[1, k]
        if k >= n_gal:
            ax.axis("off")
            continue
        ax.imshow(rgb_composite(sim.noiseless[k], bands, rgb, stretch), origin="lower")
        label = f"#{k} r={t['mag'][k]:.1f} SNR={t['snr'][k]:.0f}"
        if k == 0:
            label = (f"target r={t['mag'][0]:.1f} SNR={t['snr'][0]:.0f}\n"
                     f"B_tot={t['blendedness_total'][0]:.2f} "
                     f"B_cl={t['blendedness_closest'][0]:.2f}")
        ax.set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), dpi=110)
        plt.close(fig)
    return fig
