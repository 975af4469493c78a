"""BlendingToolKit adapter: BTK's own generator, matcher and metrics on a few blends."""

from __future__ import annotations

import numpy as np
import pytest

from probdeblend.btk_adapter import catsim_catalog

btk = pytest.importorskip("btk")


def test_catsim_catalog_schema_and_sizes():
    t = catsim_catalog(200, seed=1)
    for col in ("ra", "dec", "i_ab", "r_ab", "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn",
                "a_d", "b_d", "a_b", "b_b", "pa_disk", "pa_bulge", "redshift"):
        assert col in t.colnames
    assert np.all(t["b_d"] <= t["a_d"]) and np.all(t["a_d"] > 0)
    np.testing.assert_allclose(t["fluxnorm_bulge"] + t["fluxnorm_disk"], 1.0)
    assert 18 < np.median(t["r_ab"]) < 25.5


@pytest.fixture(scope="module")
def batch():
    from btk.catalog import CatsimCatalog
    from btk.sampling_functions import DefaultSampling
    from btk.survey import get_surveys

    from probdeblend.btk_adapter import CatsimGenerator

    cat = CatsimCatalog(catsim_catalog(300, seed=0))
    sampling = DefaultSampling(max_number=3, min_number=1, stamp_size=16.0, max_shift=2.5,
                               seed=3, max_mag=24.0)
    gen = CatsimGenerator(cat, sampling, get_surveys("LSST"), batch_size=3, njobs=1,
                          add_noise="all", seed=4)
    return next(gen)


def test_probdeblend_in_btk_matches_and_metrics(batch):
    from btk.match import PixelHungarianMatcher
    from btk.metrics.detection import Precision, Recall
    from btk.metrics.reconstruction import PSNR

    from probdeblend.btk_adapter import ProbdeblendDeblender

    deb = ProbdeblendDeblender(max_n_sources=6, num_samples=32, seed=0)
    out = deb(batch)
    assert len(out.catalog_list) == batch.batch_size
    assert out.deblended_images.shape == (3, 6, 6, batch.image_size, batch.image_size)
    for c in out.catalog_list:
        assert {"ra", "dec", "x_peak", "y_peak", "flux_r", "flux_r_err", "e1"} <= set(c.colnames)
    assert all("posterior" in e for e in out.extra_data)
    m = PixelHungarianMatcher(pixel_max_sep=3.0)(batch.catalog_list, out.catalog_list)
    n_match = np.array([len(x) for x in m.true_matches])
    assert Recall(3)(n_match, m.n_true, m.n_pred) >= 0.6
    assert Precision(3)(n_match, m.n_true, m.n_pred) >= 0.8
    t_iso = m.match_true_arrays(batch.isolated_images)
    p_deb = m.match_pred_arrays(out.deblended_images)
    assert PSNR(3)(t_iso[:, :, 2], p_deb[:, :, 2]) > 20
    # the same batch deblended blend by blend (BTK's per-example path) gives the same sources
    one = deb.deblend(1, batch)
    np.testing.assert_allclose(np.sort(one.catalog["x_peak"]),
                               np.sort(out.catalog_list[1]["x_peak"]), atol=0.5)


def test_truth_positions_mode(batch):
    from probdeblend.btk_adapter import ProbdeblendDeblender

    out = ProbdeblendDeblender(6, num_samples=8, render=False, use_truth_positions=True)(batch)
    for truth, c in zip(batch.catalog_list, out.catalog_list, strict=True):
        assert len(c) == len(truth)
        assert out.deblended_images is None
