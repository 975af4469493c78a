"""Two blended galaxies fitted with a learned prior inside your own Pyro model.

The learned prior is a Pyro distribution over each galaxy's latent morphology ``z``;
``prior.decode(z, flux)`` turns it into a noiseless galaxy image in the prior's model frame.
Here we write the whole forward model by hand (positions known, sub-pixel shifts by a Fourier
phase ramp, Gaussian pixel noise), simulate a scene from the prior itself, and fit it with

1. SVI (``AutoNormal`` guide),
2. NUTS in Pyro, initialised at the SVI solution,
3. NUTS in NumPyro with the prior's JAX twin (``prior.to_numpyro()``), jitted.

Run::

    python examples/custom_pyro_model.py --prior lsst-vae            # a shipped prior
    python examples/custom_pyro_model.py --prior path/to/my-prior.json --tiny

``--tiny`` runs a handful of steps only (used by the test suite). If the requested prior cannot
be found, the example trains an UNTRAINED-quality tiny prior in a temporary folder so that the
plumbing can still be exercised; its results are meaningless.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_median
from pyro.infer.autoguide.initialization import init_to_value

from probdeblend.errors import PriorLoadError
from probdeblend.priors import load_prior
from probdeblend.priors.train import build_tiny_prior

LOG_FLUX_LOC, LOG_FLUX_SCALE = math.log(2000.0), 1.0  # prior on each band's total flux


def get_prior(name_or_path: str, workdir: str):
    """Load the prior, or build a tiny untrained one when it does not exist."""
    try:
        return load_prior(name_or_path)
    except PriorLoadError as e:
        print(f"[custom_pyro_model] {e}")
        print(
            "[custom_pyro_model] -> using an UNTRAINED tiny prior built in a temporary folder "
            f"({workdir}); the fit only exercises the plumbing, its results are meaningless."
        )
        return load_prior(build_tiny_prior(workdir, name="tiny-untrained"))


def shift_stamp(stamp: torch.Tensor, size: int, dx: float, dy: float) -> torch.Tensor:
    """Embed ``stamp (band, n, n)`` centred in a ``size x size`` canvas, shifted by (dx, dy) px.

    Sub-pixel shifts use a Fourier phase ramp (band-limited interpolation).
    """
    n = stamp.shape[-1]
    lo = (size - n) // 2
    canvas = torch.nn.functional.pad(stamp, (lo, size - n - lo, lo, size - n - lo))
    ky = torch.fft.fftfreq(size, dtype=stamp.dtype)[:, None]
    kx = torch.fft.rfftfreq(size, dtype=stamp.dtype)[None, :]
    phase = torch.exp(-2j * math.pi * (kx * dx + ky * dy))
    return torch.fft.irfft2(torch.fft.rfft2(canvas) * phase, s=(size, size))


def make_model(prior, size: int, offsets, sigma: float):
    n_gal, n_bands = len(offsets), prior.frame.n_bands

    def render(z, log_flux):
        stamps = prior.decode(z, log_flux.exp())  # (galaxy, band, y, x)
        return sum(shift_stamp(stamps[k], size, *offsets[k]) for k in range(n_gal))

    def model(obs=None):
        with pyro.plate("galaxies", n_gal):
            z = pyro.sample("z", prior)  # (galaxy, latent)
            log_flux = pyro.sample(
                "log_flux",
                dist.Normal(LOG_FLUX_LOC, LOG_FLUX_SCALE).expand([n_gal, n_bands]).to_event(1),
            )
        scene = render(z, log_flux)
        pyro.sample("obs", dist.Normal(scene, sigma).to_event(3), obs=obs)
        return scene

    return model, render


def run_numpyro(prior, obs: np.ndarray, size: int, offsets, sigma: float, init: dict, args):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC as NMCMC
    from numpyro.infer import NUTS as NNUTS
    from numpyro.infer import init_to_value as ninit_to_value

    jprior = prior.to_numpyro()
    n_gal, n_bands = len(offsets), prior.frame.n_bands
    n = prior.frame.stamp_size
    lo = (size - n) // 2
    ky = jnp.fft.fftfreq(size)[:, None]
    kx = jnp.fft.rfftfreq(size)[None, :]

    def place(stamp, dx, dy):
        canvas = jnp.pad(stamp, ((0, 0), (lo, size - n - lo), (lo, size - n - lo)))
        phase = jnp.exp(-2j * jnp.pi * (kx * dx + ky * dy))
        return jnp.fft.irfft2(jnp.fft.rfft2(canvas) * phase, s=(size, size))

    def model(obs=None):
        with numpyro.plate("galaxies", n_gal):
            z = numpyro.sample("z", jprior)
            log_flux = numpyro.sample(
                "log_flux",
                ndist.Normal(LOG_FLUX_LOC, LOG_FLUX_SCALE).expand([n_gal, n_bands]).to_event(1),
            )
        stamps = jprior.decode(z, jnp.exp(log_flux))
        scene = sum(place(stamps[k], *offsets[k]) for k in range(n_gal))
        numpyro.sample("obs", ndist.Normal(scene, sigma).to_event(3), obs=obs)

    n_warm, n_samp = (3, 3) if args.tiny else (200, 200)
    t0 = time.perf_counter()
    values = {k: jnp.asarray(v.numpy()) for k, v in init.items()}
    kernel = NNUTS(
        model, init_strategy=ninit_to_value(values=values), max_tree_depth=3 if args.tiny else 8
    )
    mcmc = NMCMC(kernel, num_warmup=n_warm, num_samples=n_samp, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(args.seed), obs=jnp.asarray(obs))
    post = mcmc.get_samples()
    print(
        f"NumPyro NUTS ({n_warm}+{n_samp}, jitted JAX twin): {time.perf_counter() - t0:.1f} s; "
        f"posterior mean fluxes {np.exp(np.asarray(post['log_flux'])).mean(0).mean(-1).round()}"
    )
    return post


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="lsst-vae", help="shipped prior name or path")
    parser.add_argument("--tiny", action="store_true", help="a few steps only (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-numpyro", action="store_true", help="skip the NumPyro part")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.tiny else 2)
    pyro.set_rng_seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="probdeblend-example-") as workdir:
        prior = get_prior(args.prior, workdir)
    print(f"prior: {prior}")
    n = prior.frame.stamp_size
    size = n + n // 2
    offsets = [(-0.18 * n, -0.05 * n), (0.15 * n, 0.1 * n)]  # (dx, dy) pixels from centre
    sigma = 1.0

    # --- simulate a scene from the prior (truth) -------------------------------------------
    model, render = make_model(prior, size, offsets, sigma)
    with torch.no_grad():
        z_true = prior.sample((len(offsets),))
        log_flux_true = torch.full((len(offsets), prior.frame.n_bands), LOG_FLUX_LOC)
        truth = render(z_true, log_flux_true)
        obs = truth + sigma * torch.randn(truth.shape)
    print(
        f"scene {tuple(obs.shape)} (band, y, x), true fluxes {log_flux_true.exp()[:, 0].tolist()}"
    )

    # --- SVI -------------------------------------------------------------------------------------
    pyro.clear_param_store()
    guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    n_steps = 5 if args.tiny else 500
    t0 = time.perf_counter()
    losses = [svi.step(obs) for _ in range(n_steps)]
    med = guide.median()
    print(
        f"SVI ({n_steps} steps): {time.perf_counter() - t0:.1f} s, loss {losses[0]:.4g} -> "
        f"{losses[-1]:.4g}; fluxes {med['log_flux'].exp().detach().mean(-1).round().tolist()}"
    )

    # --- NUTS in Pyro, from the SVI solution ----------------------------------------------
    n_warm, n_samp = (3, 3) if args.tiny else (100, 100)
    init = {k: v.detach() for k, v in med.items()}
    kernel = NUTS(
        model, init_strategy=init_to_value(values=init), max_tree_depth=3 if args.tiny else 8
    )
    t0 = time.perf_counter()
    mcmc = MCMC(kernel, num_samples=n_samp, warmup_steps=n_warm, disable_progbar=True)
    mcmc.run(obs)
    post = mcmc.get_samples()
    print(
        f"Pyro NUTS ({n_warm}+{n_samp}): {time.perf_counter() - t0:.1f} s; posterior mean "
        f"fluxes {post['log_flux'].exp().mean(0).mean(-1).round().tolist()}"
    )

    out = {"svi_losses": losses, "nuts_samples": post, "prior": prior}
    if not args.no_numpyro:
        out["numpyro_samples"] = run_numpyro(prior, obs.numpy(), size, offsets, sigma, init, args)
    return out


if __name__ == "__main__":
    main()
