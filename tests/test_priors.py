"""Tests of probdeblend.priors: frame, networks, flow, Pyro / NumPyro distributions, I/O, training.

Everything uses tiny models (latent 4, channels (4, 8, 8, 8), 3 bands, 24-pixel stamps) trained
for one epoch on a couple of hundred simple GalSim galaxies; no full model is ever trained.
"""

from __future__ import annotations

import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probdeblend.errors import ChecksumMismatchError, PriorLoadError, UnknownBandError
from probdeblend.priors import (
    LSST_FRAME,
    LatentFlow,
    LearnedPrior,
    ModelFrame,
    TrainConfig,
    encoder_input,
    fit_flow,
    list_priors,
    load_prior,
    save_prior,
    train_prior,
)
from probdeblend.priors.train import split_indices, toy_galaxies

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FRAME = ModelFrame(bands=("g", "r", "i"), stamp_size=24)
LATENT = 4


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        latent_dim=LATENT,
        channels=(4, 8, 8, 8),
        epochs=1,
        batch_size=32,
        lr=3e-3,
        disc_channels=(4, 8),
        flow_layers=4,
        flow_hidden=16,
        flow_epochs=3,
        flow_batch_size=64,
        seed=0,
        num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    """192 noiseless bulge+disk GalSim galaxies in FRAME (fixture helper: toy_galaxies)."""
    return toy_galaxies(192, FRAME, seed=0)


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory, images):
    """A folder with a tiny flow prior ("tiny-flow") and the same networks without flow."""
    d = tmp_path_factory.mktemp("priors")
    cfg = tiny_config()
    enc, dec, hist = train_prior(images, cfg, d / "run", progress=False)
    flow = fit_flow(enc, images, cfg, progress=False)
    card = {"frame": FRAME, "training": {"history": hist}, "data": {"n": 192}}
    save_prior(d / "tiny-flow", enc, dec, flow, {**card, "name": "tiny-flow"})
    save_prior(d / "tiny-normal", enc, dec, None, {**card, "name": "tiny-normal"})
    return d


@pytest.fixture(scope="module")
def prior(prior_dir):
    return load_prior(prior_dir / "tiny-flow.json")


@pytest.fixture(scope="module")
def prior_normal(prior_dir):
    return load_prior(prior_dir / "tiny-normal")


@pytest.fixture(params=["flow", "normal"])
def any_prior(request, prior, prior_normal):
    return prior if request.param == "flow" else prior_normal


# -- model frame ----------------------------------------------------------------------------------
def test_frame_roundtrip_and_psf():
    assert LSST_FRAME.bands == ("u", "g", "r", "i", "z", "y")
    assert LSST_FRAME.center == (23.5, 23.5)
    assert ModelFrame.from_dict(json.loads(json.dumps(FRAME.to_dict()))) == FRAME
    psf = FRAME.psf_image(25)
    assert psf.shape == (25, 25) and psf.dtype == np.float32
    assert psf.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.unravel_index(psf.argmax(), psf.shape) == (12, 12)
    # FWHM of the drawn profile matches psf_fwhm (Gaussian: sigma = FWHM / 2.3548; the pixel
    # response adds 1/12 pixel^2 to the variance)
    y, x = np.mgrid[:25, :25] - 12.0
    sigma_pix = math.sqrt((psf * x**2).sum() - 1.0 / 12.0)
    assert sigma_pix * FRAME.pixel_scale * 2.3548 == pytest.approx(FRAME.psf_fwhm, rel=0.01)
    with pytest.raises(ValueError, match="odd"):
        FRAME.psf_image(24)
    with pytest.raises(UnknownBandError, match="its bands are"):
        FRAME.select(["z"])
    assert FRAME.select(["i", "g"]).bands == ("i", "g")
    with pytest.raises(TypeError, match="tuple"):
        ModelFrame(bands="gri")


def test_toy_galaxies_centred(images):
    assert images.shape == (192, 3, 24, 24) and np.isfinite(images).all()
    img = images[:, 1]
    y, x = np.mgrid[:24, :24]
    xc = (img * x).sum((1, 2)) / img.sum((1, 2))
    yc = (img * y).sum((1, 2)) / img.sum((1, 2))
    np.testing.assert_allclose(xc, FRAME.center[0], atol=0.05)
    np.testing.assert_allclose(yc, FRAME.center[1], atol=0.05)


def test_encoder_input_transform():
    x = torch.ones(2, 3, 8, 8) * 7.0
    np.testing.assert_allclose(encoder_input(x).numpy(), np.arcsinh(1.0), rtol=1e-6)
    assert torch.isfinite(encoder_input(torch.zeros(1, 3, 8, 8))).all()


# -- distribution contract ------------------------------------------------------------------------
SHAPES = [((), ()), ((3,), ()), ((), (4,)), ((2, 3), (4,)), ((5,), (2, 1)), ((2,), (3, 2))]


@pytest.mark.parametrize(("sample_shape", "batch_shape"), SHAPES)
def test_shapes(any_prior, sample_shape, batch_shape):
    d = any_prior.expand(batch_shape) if batch_shape else any_prior
    assert d.batch_shape == batch_shape and d.event_shape == (LATENT,)
    z = d.rsample(sample_shape)
    assert z.shape == sample_shape + batch_shape + (LATENT,)
    assert d.sample(sample_shape).shape == z.shape
    lp = d.log_prob(z)
    assert lp.shape == sample_shape + batch_shape and torch.isfinite(lp).all()
    img = d.decode(z)
    assert img.shape == sample_shape + batch_shape + FRAME.shape
    # expand keeps the networks and attributes; values broadcast against the batch shape
    assert d.decoder is any_prior.decoder and d.frame == any_prior.frame
    if batch_shape:
        assert d.log_prob(torch.zeros(LATENT)).shape == batch_shape


def test_contract_attributes(prior, prior_normal):
    from torch.distributions import constraints

    for p in (prior, prior_normal):
        assert p.support is constraints.real_vector
        assert p.has_rsample and p.event_dim == 1
        assert p.latent_dim == LATENT and p.bands == FRAME.bands and p.frame == FRAME
        assert all(not q.requires_grad for q in p.decoder.parameters())
        assert not p.decoder.training and not p.encoder.training
    assert prior.name == "tiny-flow" and prior.latent_prior == "flow"
    assert prior_normal.latent_prior == "normal" and prior.card["kind"] == "vae"
    assert "tiny-flow" in repr(prior)


def test_event_shape_validation(prior):
    with pytest.raises(ValueError, match=r"Expected event shape \(4,\), but got \(2, 3\)"):
        prior.log_prob(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Expected event shape"):
        prior.decode(torch.zeros(5))
    with pytest.raises(ValueError, match="not broadcastable"):
        prior.expand((3,)).log_prob(torch.zeros(2, LATENT))


def test_gradients_flow_to_z_only(prior):
    z = prior.rsample((3,)).requires_grad_(True)
    loss = prior.log_prob(z).sum() + (prior.decode(z) ** 2).sum()
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.flow.parameters())
    # rsample is a differentiable (reparameterised) transform of the base noise
    u = torch.randn(3, LATENT, requires_grad=True)
    prior.flow(u)[0].sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


def test_log_prob_normal_matches_torch(prior_normal):
    z = torch.randn(7, LATENT) * 2
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(prior_normal.log_prob(z), ref)
    assert prior_normal.log_prob(z.double()).dtype == torch.float64


def test_log_prob_flow_change_of_variables(prior):
    """Flow log_prob == N(f^-1(z)) + log|det d f^-1 / dz| with the Jacobian from autograd."""
    flow = prior.flow
    torch.manual_seed(1)
    zs = prior.sample((5,)).double()
    flow64 = (
        LatentFlow(LATENT, flow.n_layers, flow.hidden, flow.s_max).double().requires_grad_(False)
    )
    flow64.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in flow.state_dict().items()}
    )
    for z in zs:
        u = flow64.inverse(z)[0]
        jac = torch.autograd.functional.jacobian(lambda x: flow64.inverse(x)[0], z)
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum() + torch.linalg.slogdet(jac)[1]
        assert float(prior.log_prob(z.float()).detach()) == pytest.approx(float(ref), abs=1e-4)
    # forward and inverse are each other's inverse; their log-dets cancel
    u = torch.randn(6, LATENT)
    z, ld = flow(u)
    u2, ld2 = flow.inverse(z)
    torch.testing.assert_close(u2, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld + ld2, torch.zeros(6), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def flow2d():
    torch.manual_seed(3)
    flow = LatentFlow(2, n_layers=4, hidden=16, s_max=1.0, seed=3)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.4 * torch.randn_like(p))
    return flow.eval()


def test_flow_2d_density_integrates_to_one(flow2d):
    with torch.no_grad():
        s = flow2d.sample((20000,))
        lo, hi = s.min(0).values - 3, s.max(0).values + 3
        n = 600
        gx = torch.linspace(float(lo[0]), float(hi[0]), n)
        gy = torch.linspace(float(lo[1]), float(hi[1]), n)
        zz = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
        dens = flow2d.log_prob(zz).exp().reshape(n, n)
    area = float((gx[1] - gx[0]) * (gy[1] - gy[0]))
    assert float(dens.sum()) * area == pytest.approx(1.0, abs=1e-2)


def test_flow_2d_samples_agree_with_log_prob(flow2d):
    """Goodness of fit: probability of boxes from the density vs fraction of samples."""
    torch.manual_seed(4)
    with torch.no_grad():
        s = flow2d.sample((40000,))
        q = torch.quantile(s[:2000], torch.tensor([0.2, 0.5, 0.8]), dim=0)
        n = 400
        boxes = [
            (q[0], q[1]),
            (q[1], q[2]),
            (torch.stack([q[0, 0], q[1, 1]]), torch.stack([q[1, 0], q[2, 1]])),
        ]
        for a, b in boxes:
            gx = torch.linspace(float(a[0]), float(b[0]), n + 1)
            gy = torch.linspace(float(a[1]), float(b[1]), n + 1)
            cx, cy = (gx[1:] + gx[:-1]) / 2, (gy[1:] + gy[:-1]) / 2
            zz = torch.stack(torch.meshgrid(cx, cy, indexing="ij"), -1).reshape(-1, 2)
            mass = float(flow2d.log_prob(zz).exp().sum() * (gx[1] - gx[0]) * (gy[1] - gy[0]))
            inside = ((s >= a) & (s <= b)).all(-1).float().mean()
            se = math.sqrt(mass * (1 - mass) / len(s))
            assert abs(float(inside) - mass) < 4 * se + 2e-3
        # entropy two ways: -E[log p(z)] and H(N) + E[log|det dz/du|] (autograd Jacobian)
        u = torch.randn(300, 2)
        z = flow2d(u)[0]
        h1 = float(-flow2d.log_prob(z).mean())
    logdets = [
        torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda x: flow2d(x)[0], ui))[1]
        for ui in u
    ]
    h_base = -torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1).mean()
    assert h1 == pytest.approx(float(h_base + torch.stack(logdets).mean()), abs=1e-4)


# -- decode / encode ------------------------------------------------------------------------------
@pytest.mark.parametrize("zshape", [(), (5,), (2, 3)])
def test_decode_flux_normalised(prior, zshape):
    z = torch.randn(zshape + (LATENT,))
    img = prior.decode(z)
    assert img.shape == zshape + FRAME.shape
    assert (img >= 0).all()
    torch.testing.assert_close(img.sum((-2, -1)), torch.ones(zshape + (3,)), atol=1e-5, rtol=0)
    flux = torch.tensor([10.0, 20.0, 30.0])
    torch.testing.assert_close(
        prior.decode(z, flux).sum((-2, -1)), flux.expand(zshape + (3,)), rtol=1e-5, atol=1e-4
    )


def test_band_selection(prior_dir, prior):
    sub = load_prior(prior_dir / "tiny-flow.json", bands=["i", "g"])
    assert sub.bands == ("i", "g") and sub.frame.n_bands == 2
    z = torch.randn(3, LATENT)
    torch.testing.assert_close(sub.decode(z), prior.decode(z)[:, [2, 0]])
    torch.testing.assert_close(sub.log_prob(z), prior.log_prob(z))
    jsub = sub.to_numpyro()
    np.testing.assert_allclose(np.asarray(jsub.decode(z.numpy())), sub.decode(z).numpy(), atol=1e-6)


def test_encode(prior, images):
    loc, scale = prior.encode(torch.from_numpy(images[:5]))
    assert loc.shape == (5, LATENT) and (scale > 0).all()
    # flux scale does not matter
    loc2, _ = prior.encode(torch.from_numpy(images[:5] * 1e3))
    torch.testing.assert_close(loc, loc2, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="images must have shape"):
        prior.encode(torch.zeros(2, 3, 48, 48))


# -- Pyro inference -------------------------------------------------------------------------------
def _pyro_model(prior, n_gal=2):
    import pyro
    import pyro.distributions as dist

    def model(obs):
        with pyro.plate("galaxies", n_gal):
            z = pyro.sample("z", prior)
            log_flux = pyro.sample("log_flux", dist.Normal(5.0, 1.0).expand([n_gal, 3]).to_event(1))
        image = prior.decode(z, log_flux.exp()).sum(0)
        pyro.sample("obs", dist.Normal(image, 0.5).to_event(3), obs=obs)

    return model


def test_pyro_svi(prior):
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    obs = prior.decode(prior.sample((2,)), torch.full((2, 3), 150.0)).sum(0)
    model = _pyro_model(prior)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(obs) for _ in range(5)]
    assert np.isfinite(losses).all()
    # the prior is a site of the trace with the right log-density
    tr = pyro.poutine.trace(model).get_trace(obs)
    site = tr.nodes["z"]
    assert site["value"].shape == (2, LATENT)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), prior.log_prob(site["value"]))


def test_pyro_nuts(prior):
    import pyro
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(1)
    obs = prior.decode(prior.sample((2,)), torch.full((2, 3), 150.0)).sum(0)
    mcmc = MCMC(
        NUTS(_pyro_model(prior), max_tree_depth=3),
        num_samples=4,
        warmup_steps=4,
        disable_progbar=True,
    )
    mcmc.run(obs)
    z = mcmc.get_samples()["z"]
    assert z.shape == (4, 2, LATENT) and torch.isfinite(z).all()


# -- JAX / NumPyro twin ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["flow", "normal"])
def test_jax_parity(prior, prior_normal, which):
    import jax

    p = prior if which == "flow" else prior_normal
    jp = p.to_numpyro()
    torch.manual_seed(5)
    z = torch.randn(16, LATENT) * 1.5
    img_t = p.decode(z).numpy()
    img_j = np.asarray(jax.jit(jp.decode)(z.numpy()))
    assert np.abs(img_t - img_j).max() / np.abs(img_t).max() < 1e-4
    lp_t, lp_j = p.log_prob(z).numpy(), np.asarray(jax.jit(jp.log_prob)(z.numpy()))
    assert np.abs(lp_t - lp_j).max() < 1e-4
    x = img_t[:4] * 100.0
    loc_t, scale_t = p.encode(torch.from_numpy(x))
    loc_j, scale_j = jp.encode(x)
    np.testing.assert_allclose(np.asarray(loc_j), loc_t.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(scale_j), scale_t.numpy(), atol=1e-4, rtol=1e-4)
    # gradients w.r.t. z agree too
    zt = z[:2].clone().requires_grad_(True)
    (p.log_prob(zt).sum() + (p.decode(zt) ** 2).sum() * 100).backward()
    gj = jax.grad(lambda v: jp.log_prob(v).sum() + (jp.decode(v) ** 2).sum() * 100)(z[:2].numpy())
    np.testing.assert_allclose(np.asarray(gj), zt.grad.numpy(), atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def jprior(prior):
    return prior.to_numpyro()


@pytest.mark.parametrize(("sample_shape", "batch_shape"), SHAPES)
def test_numpyro_shapes(jprior, sample_shape, batch_shape):
    import jax
    from numpyro.distributions import constraints

    d = jprior.expand(batch_shape) if batch_shape else jprior
    assert d.support is constraints.real_vector and d.event_shape == (LATENT,)
    z = d.sample(jax.random.PRNGKey(0), sample_shape)
    assert z.shape == sample_shape + batch_shape + (LATENT,)
    assert d.log_prob(z).shape == sample_shape + batch_shape
    if sample_shape == (2, 3):
        assert d.decode(z).shape == sample_shape + batch_shape + FRAME.shape
    with pytest.raises(ValueError, match="Expected event shape"):
        d.log_prob(np.zeros((2, LATENT + 1)))


def test_decode_in_cpu_blocks_matches_one_batch(jprior):
    """Decoding many latents in CPU blocks (lax.map) gives the single-batch result, including
    a count that is not a multiple of the block, and gradients flow through it."""
    import jax
    import jax.numpy as jnp

    twin = jprior.twin
    z = np.random.default_rng(0).normal(size=(11, LATENT)).astype(np.float32)
    blocked = np.asarray(twin.decode(z))
    one = np.stack([np.asarray(twin._decode_block(jnp.asarray(v[None])))[0] for v in z])
    assert blocked.shape == (11,) + FRAME.shape
    assert np.allclose(blocked, one, rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda v: (twin.decode(v) ** 2).sum())(jnp.asarray(z))
    g1 = jax.grad(lambda v: (twin._decode_block(v) ** 2).sum())(jnp.asarray(z))
    assert np.allclose(np.asarray(g), np.asarray(g1), rtol=1e-4, atol=1e-6)


def test_numpyro_model_runs(prior, jprior):
    """The twin inside a NumPyro model: jit-ed potential and gradient match the torch model."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer.util import log_density

    torch.manual_seed(2)
    obs_t = prior.decode(prior.sample((2,)), torch.full((2, 3), 150.0)).sum(0)
    obs = jnp.asarray(obs_t.numpy())

    def model(obs):
        with numpyro.plate("galaxies", 2):
            z = numpyro.sample("z", jprior)
            log_flux = numpyro.sample("log_flux", ndist.Normal(5.0, 1.0).expand([2, 3]).to_event(1))
        image = jprior.decode(z, jnp.exp(log_flux)).sum(0)
        numpyro.sample("obs", ndist.Normal(image, 0.5).to_event(3), obs=obs)

    def potential(params):
        return -log_density(model, (obs,), {}, params)[0]

    z = torch.randn(2, LATENT)
    lf = torch.full((2, 3), 5.0) + 0.1 * torch.randn(2, 3)
    params = {"z": jnp.asarray(z.numpy()), "log_flux": jnp.asarray(lf.numpy())}
    v, g = jax.jit(jax.value_and_grad(potential))(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in g.values())
    image_t = prior.decode(z, lf.exp()).sum(0)
    ref = -(
        prior.log_prob(z).sum()
        + torch.distributions.Normal(5.0, 1.0).log_prob(lf).sum()
        + torch.distributions.Normal(image_t, 0.5).log_prob(obs_t).sum()
    )
    assert float(v) == pytest.approx(float(ref), rel=1e-4)


# -- I/O ------------------------------------------------------------------------------------------
def _copy_prior(src_dir: Path, dst_dir: Path, name="tiny-flow") -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for ext in (".json", ".safetensors"):
        shutil.copy(src_dir / f"{name}{ext}", dst_dir / f"{name}{ext}")
    return dst_dir / name


def test_card_contents(prior_dir):
    card = json.loads((prior_dir / "tiny-flow.json").read_text())
    for key in (
        "name",
        "kind",
        "architecture",
        "frame",
        "latent_prior",
        "training",
        "data",
        "validation",
        "sha256",
        "file_size_bytes",
    ):
        assert key in card
    assert card["latent_prior"] == "flow" and card["architecture"]["latent_dim"] == LATENT
    assert card["file_size_bytes"] == (prior_dir / "tiny-flow.safetensors").stat().st_size
    assert not list(prior_dir.glob("*.tmp-*"))
    from safetensors.numpy import load_file

    keys = load_file(str(prior_dir / "tiny-flow.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "flow"}


def test_load_by_name_path_and_stem(prior_dir, prior, monkeypatch):
    monkeypatch.setenv("PROBDEBLEND_PRIORS_DIR", str(prior_dir))
    assert list_priors() == ["tiny-flow", "tiny-normal"]
    z = torch.randn(2, LATENT)
    for ref in (
        "tiny-flow",
        prior_dir / "tiny-flow",
        prior_dir / "tiny-flow.safetensors",
        str(prior_dir / "tiny-flow.json"),
    ):
        torch.testing.assert_close(load_prior(ref).decode(z), prior.decode(z))


def test_missing_prior_lists_available(prior_dir, monkeypatch):
    monkeypatch.setenv("PROBDEBLEND_PRIORS_DIR", str(prior_dir))
    with pytest.raises(PriorLoadError, match="not found") as err:
        load_prior("lsst-vae-does-not-exist")
    assert "tiny-flow" in str(err.value) and "tiny-normal" in str(err.value)


def test_checksum_mismatch(prior_dir, tmp_path):
    stem = _copy_prior(prior_dir, tmp_path)
    w = stem.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    card = json.loads(stem.with_suffix(".json").read_text())
    with pytest.raises(ChecksumMismatchError) as err:
        load_prior(stem)
    msg = str(err.value)
    assert card["sha256"] in msg and "Re-download" in msg
    assert isinstance(err.value, PriorLoadError)


def test_card_missing_key(prior_dir, tmp_path):
    stem = _copy_prior(prior_dir, tmp_path)
    cpath = stem.with_suffix(".json")
    card = json.loads(cpath.read_text())
    del card["frame"]
    cpath.write_text(json.dumps(card))
    with pytest.raises(PriorLoadError, match=r"missing the keys \['frame'\]"):
        load_prior(cpath)
    cpath.write_text("{not json")
    with pytest.raises(PriorLoadError, match="not readable JSON"):
        load_prior(cpath)


def test_missing_weights_file(prior_dir, tmp_path):
    stem = _copy_prior(prior_dir, tmp_path)
    stem.with_suffix(".safetensors").unlink()
    with pytest.raises(PriorLoadError, match="weights .* are missing"):
        load_prior(stem)


def test_wrong_bands(prior_dir):
    with pytest.raises(
        UnknownBandError, match=r"no band\(s\) \['z'\]; its bands are \['g', 'r', 'i'\]"
    ):
        load_prior(prior_dir / "tiny-flow", bands=["g", "z"])


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae", "vaegan"])
def test_training_smoke(images, tmp_path, kind):
    bad = images[:130].copy()
    bad[0] = 0.0
    bad[1, 2] = np.nan
    enc, dec, hist = train_prior(bad, tiny_config(kind=kind), tmp_path, progress=False)
    assert hist["n_skipped"] == 2 and hist["n_train"] + hist["n_val"] == 128
    assert np.isfinite(hist["train_loss"]).all() and np.isfinite(hist["val_loss"]).all()
    assert hist["val_loss"][-1] < hist["val_loss_init"]
    assert (tmp_path / "checkpoint.pt").is_file()
    if kind == "vaegan":
        assert np.isfinite(hist["disc_loss"]).all() and np.isfinite(hist["gan_loss"]).all()
    flow = fit_flow(enc, bad, tiny_config(kind=kind), progress=False)
    assert np.isfinite(flow.fit_history["val_nll"]).all()


def test_split_is_disjoint_and_seeded(images):
    tr, va = split_indices(images, tiny_config())
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(images)
    tr2, va2 = split_indices(images, tiny_config())
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, split_indices(images, tiny_config(seed=1))[1])


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_determinism(images):
    data = images[:96]
    e1, d1, _ = train_prior(data, tiny_config(kind="vaegan"), None, progress=False)
    e2, d2, _ = train_prior(data, tiny_config(kind="vaegan"), None, progress=False)
    assert _same_weights(e1, e2) and _same_weights(d1, d2)
    e3, _, _ = train_prior(data, tiny_config(kind="vaegan", seed=5), None, progress=False)
    assert not _same_weights(e1, e3)
    f1 = fit_flow(e1, data, tiny_config(), progress=False)
    f2 = fit_flow(e2, data, tiny_config(), progress=False)
    assert _same_weights(f1, f2)


def test_resume_continues_exactly(images, tmp_path):
    data = images[:96]
    cfg = tiny_config(kind="vaegan", epochs=2)
    e_ref, d_ref, h_ref = train_prior(data, cfg, tmp_path / "a", progress=False)
    # interrupted after the first epoch, then resumed
    train_prior(data, cfg, tmp_path / "b", progress=False, callback=lambda epoch, h: epoch == 1)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1
    e, d, h = train_prior(data, cfg, tmp_path / "b", progress=False, resume=True)
    assert h["epoch"] == [1, 2]
    assert _same_weights(e, e_ref) and _same_weights(d, d_ref)
    assert h["val_loss"] == h_ref["val_loss"]
    with pytest.raises(ValueError, match="cannot resume"):
        train_prior(
            data,
            tiny_config(kind="vaegan", epochs=2, lr=1e-2),
            tmp_path / "b",
            progress=False,
            resume=True,
        )


# -- example --------------------------------------------------------------------------------------
def test_example_custom_pyro_model(prior_dir, monkeypatch, capsys):
    script = REPO / "examples" / "custom_pyro_model.py"
    monkeypatch.setattr(
        sys,
        "argv",
        [str(script), "--tiny", "--no-numpyro", "--prior", str(prior_dir / "tiny-flow.json")],
    )
    ns = runpy.run_path(str(script), run_name="not_main")
    out = ns["main"]()
    assert np.isfinite(out["svi_losses"]).all()
    assert torch.isfinite(out["nuts_samples"]["z"]).all()
    assert "Pyro NUTS" in capsys.readouterr().out


def test_save_rejects_mismatched_frame(prior, tmp_path):
    with pytest.raises(PriorLoadError, match="decoder has 3 bands"):
        save_prior(tmp_path / "x", prior.encoder, prior.decoder, None, {"frame": LSST_FRAME})
    assert not list(tmp_path.iterdir())


def test_learned_prior_direct_construction(prior):
    p = LearnedPrior(prior.encoder, prior.decoder, prior.flow, FRAME)
    assert p.name == "unnamed-prior" and p.sample((2,)).shape == (2, LATENT)


# -- store, named weights, explicit caches --------------------------------------------------------
def test_export_weights_semantic_names(prior):
    w = prior.export_weights()
    assert "decoder.block0.conv1.weight" in w and "decoder.block2.conv2.bias" in w
    assert "encoder.stem.weight" in w and "encoder.down3.weight" in w
    assert "flow.coupling0.perm" in w and "flow.coupling3.mlp2.weight" in w
    # no nn.Sequential position indices (``blocks.0.1.weight``) in any name
    assert not any(part.isdigit() for k in w for part in k.split("."))
    assert all(isinstance(v, np.ndarray) for v in w.values())


def test_numpyro_twin_is_cached_and_clearable(prior_dir):
    p = load_prior(prior_dir / "tiny-flow")
    twin = p.to_numpyro().twin
    assert p.to_numpyro().twin is twin and p.expand((3,)).to_numpyro().twin is twin
    assert p.expand((3,)).to_numpyro().batch_shape == (3,)
    assert p.to_numpyro(fast_grad=True).twin is not twin
    p.clear_cache()
    assert not p.cache and p.to_numpyro().twin is not twin


def test_load_leaves_flush_denormal_alone(prior_dir):
    from probdeblend.training import _flush_is_on

    was_on = _flush_is_on()
    torch.set_flush_denormal(False)
    try:
        p = load_prior(prior_dir / "tiny-flow")
        p.decode(torch.zeros(2, LATENT))
        assert not _flush_is_on()
    finally:
        torch.set_flush_denormal(was_on)


@pytest.mark.parametrize("name", ["lsst-vae", "lsst-vaegan"])
def test_shipped_priors_load_with_checksums(name):
    from probdeblend.priors import store

    card_path, weights_path = store.resolve_files(name)
    card = store.read_prior_card(card_path)
    store.verify_checksum(card, card_path, weights_path, writer="save_prior")  # files unchanged
    p = load_prior(name)
    z = torch.zeros(2, p.latent_dim)
    np.testing.assert_allclose(
        np.asarray(p.to_numpyro().decode(z.numpy())), p.decode(z).numpy(), atol=1e-6
    )


@pytest.mark.parametrize("name", ["lsst-vae", "lsst-vaegan"])
def test_shipped_priors_know_that_faint_galaxies_are_small(name):
    """The shipped flows carry the r-magnitude map: prior draws at r = 20.5 are larger than
    at r = 26.5 (simulator: 4.7 vs 1.5 px half-light radius), the unconditional draws in
    between, as benchmarks/results/priors/size_prior*/report.md shows at scale."""
    from probdeblend.measure import half_light_radius

    p = load_prior(name)
    assert p.magnitude_band == "r"
    assert p.card["training"]["magnitude_conditional"]["n_galaxies"] >= 20000
    torch.manual_seed(0)
    r = list(p.bands).index("r")

    def hlr(mag=None):
        with torch.no_grad():
            prior = p if mag is None else p.given_magnitude(torch.full((64,), mag))
            img = p.decode(prior.expand((64,)).sample())[:, r].numpy()
        return float(np.median(half_light_radius(img)))

    bright, faint, marginal = hlr(20.5), hlr(26.5), hlr()
    assert bright > 1.8 * faint
    assert faint < marginal < bright


# -- magnitude-conditioned latent prior ------------------------------------------------------------
@pytest.fixture(scope="module")
def cond_prior(prior_dir, images, tmp_path_factory):
    """The tiny flow prior with a magnitude-conditioned map fitted by
    fit_magnitude_conditional (the tiny VAE's posterior has collapsed, so there is no relation
    to find: the map is then replaced by a random one, to exercise every term), then saved
    and loaded again."""
    from probdeblend.priors.flow import MagnitudeConditional
    from probdeblend.priors.train import fit_magnitude_conditional

    p = load_prior(prior_dir / "tiny-flow")
    mags = np.random.default_rng(0).uniform(23.0, 27.0, len(images))
    fit = fit_magnitude_conditional(p, images, mags, band="r", degree=2, seed=0)
    assert p.flow.context is not None and fit["n_train"] + fit["n_val"] == len(images)
    rng = np.random.default_rng(1)
    tril = np.tril(0.2 * rng.normal(size=(LATENT, LATENT)), -1) + np.diag([0.8, 0.6, 1.0, 0.7])
    p.flow.context = MagnitudeConditional(0.3 * rng.normal(size=LATENT),
                                          rng.normal(size=(LATENT, 2)), tril, "r",
                                          (23.0, 27.0), 25.0, 1.2)
    d = tmp_path_factory.mktemp("cond")
    save_prior(d / "tiny-cond", p.encoder, p.decoder, p.flow,
               {"frame": FRAME, "name": "tiny-cond"})
    return load_prior(d / "tiny-cond"), fit


def test_magnitude_conditional_fit_recovers_a_planted_relation():
    """MagnitudeConditional.fit recovers loc, W and L from base vectors drawn from a known
    map, and its held-out log density beats the unconditional N(0, I)'s."""
    from probdeblend.priors.flow import MagnitudeConditional

    rng = np.random.default_rng(2)
    d, n = 3, 20000
    loc, w = np.array([0.2, -0.1, 0.0]), np.array([[0.8, 0.1], [-0.5, 0.0], [0.0, 0.3]])
    tril = np.array([[0.6, 0.0, 0.0], [0.1, 0.8, 0.0], [0.0, -0.2, 0.5]])
    m = rng.uniform(20.0, 27.0, n)
    c = (m - 24.0) / 2.0
    u = loc + np.stack([c, c**2], -1) @ w.T + rng.normal(size=(n, d)) @ tril.T
    ctx = MagnitudeConditional.fit(u[:-2000], m[:-2000], "r", 2, mag_ref=24.0, mag_scale=2.0)
    np.testing.assert_allclose(ctx.loc.numpy(), loc, atol=0.03)
    np.testing.assert_allclose(ctx.weight.numpy(), w, atol=0.03)
    np.testing.assert_allclose(ctx.scale_tril.numpy(), tril, atol=0.03)
    assert ctx.mag_range[0] >= 20.0 and ctx.mag_range[1] <= 27.0
    with torch.no_grad():
        v = torch.as_tensor(u[-2000:], dtype=torch.float32)
        mu = ctx.mean(torch.as_tensor(m[-2000:], dtype=torch.float32))
        r = torch.linalg.solve_triangular(ctx.scale_tril, (v - mu).T, upper=False).T
        lp_cond = float((-0.5 * (r**2).sum(-1)).mean() - ctx.log_det())
    lp_marg = float(-0.5 * (u[-2000:] ** 2).sum(-1).mean())
    assert lp_cond > lp_marg + 0.5


def test_magnitude_conditional_fit_and_roundtrip(cond_prior):
    """The fitted map raises the held-out log density (the planted relation is learnable);
    it survives save / load (card config, weights, sha256); forward and inverse invert each
    other and log_prob is the change of variables, with and without a magnitude."""
    p, fit = cond_prior
    assert np.isfinite(fit["val_logp_conditional"]) and np.isfinite(fit["val_logp_marginal"])
    assert p.magnitude_band == "r"
    assert p.card["architecture"]["flow"]["context"]["degree"] == 2
    ctx = p.flow.context
    assert ctx.mag_range[0] == pytest.approx(23.0) and ctx.mag_range[1] == pytest.approx(27.0)
    assert torch.all(torch.diagonal(ctx.scale_tril) > 0)
    u = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(0))
    m = torch.linspace(22.0, 28.0, 64)  # beyond the range on both sides: clipped
    with torch.no_grad():
        z, ld = p.flow(u, m)
        u2, ld_inv = p.flow.inverse(z, m)
        assert torch.allclose(u2, u, atol=1e-4)
        assert torch.allclose(ld, -ld_inv, atol=1e-4)
        lp = p.flow.log_prob(z, m)
        ref = -0.5 * (u**2).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi) - ld
        assert torch.allclose(lp, ref, atol=1e-3)
        # the magnitude moves the prior: the same u gives other galaxies at 23 and 27
        z23, z27 = p.flow(u, torch.full((64,), 23.0))[0], p.flow(u, torch.full((64,), 27.0))[0]
        assert (z23 - z27).abs().max() > 0.1
        assert torch.equal(p.flow(u, torch.full((64,), 20.0))[0], z23)  # clipped at 23
        # no magnitude: exactly the unconditional flow
        assert torch.equal(p.flow(u)[0], load_prior_flow_only(p)(u)[0])


def load_prior_flow_only(p):
    """The flow of ``p`` with its map detached (a copy)."""
    import copy

    f = copy.deepcopy(p.flow)
    f.context = None
    return f


def test_magnitude_conditional_torch_jax_and_distributions(cond_prior):
    """The JAX twin gives the same z and log density given a magnitude; given_magnitude
    conditions both distributions (samples, log_prob); an unconditional prior ignores it."""
    import jax

    p, _ = cond_prior
    jp = p.to_numpyro()
    u = np.random.default_rng(1).normal(size=(16, LATENT)).astype(np.float32)
    m = np.linspace(22.5, 27.5, 16).astype(np.float32)
    with torch.no_grad():
        zt, ldt = p.flow(torch.as_tensor(u), torch.as_tensor(m))
        lpt = p.given_magnitude(torch.as_tensor(m)).log_prob(zt)
    zj, ldj = jp.twin.flow_forward(u, m)
    np.testing.assert_allclose(np.asarray(zj), zt.numpy(), atol=2e-4)
    np.testing.assert_allclose(np.asarray(ldj), ldt.numpy(), atol=2e-4)
    lpj = jp.given_magnitude(m).log_prob(zt.numpy())
    np.testing.assert_allclose(np.asarray(lpj), lpt.numpy(), atol=2e-3)
    uj, _ = jp.twin.flow_inverse(np.asarray(zj), m)
    np.testing.assert_allclose(np.asarray(uj), u, atol=2e-4)
    # sampling: shapes, and the conditional differs from the marginal
    s = jp.given_magnitude(m).expand((16,)).sample(jax.random.PRNGKey(0), (3,))
    assert s.shape == (3, 16, LATENT)
    zc = p.given_magnitude(torch.full((5,), 23.0)).expand((5,)).sample((2,))
    assert zc.shape == (2, 5, LATENT)
    assert not torch.allclose(p.log_prob(zt), lpt)


def test_unconditional_prior_ignores_magnitude(prior):
    """A prior without a map: magnitude_band is None and given_magnitude changes nothing."""
    assert prior.magnitude_band is None
    z = prior.sample((4,))
    assert torch.equal(prior.given_magnitude(torch.full((4,), 24.0)).log_prob(z),
                       prior.log_prob(z))
    jp = prior.to_numpyro()
    assert jp.magnitude_band is None and jp.given_magnitude(24.0).mag is None
