"""Posterior inference for a scene model: MAP, Laplace, NUTS, SVI and importance reweighting.

All engines work on the flat vector of the model's sample sites (``latent_base``, ``log_flux``,
``offset``; see :mod:`probdeblend.model`) through NumPyro's ``log_density``, jitted in JAX.

Preconditioning is what makes NUTS fast here: the posterior of a galaxy scene is badly scaled
(fluxes known to 1%, some latent directions barely constrained), so the default diagonal
adaptation collapses to tiny steps. We find the MAP (L-BFGS from the amortized / initial guess),
take the Hessian of the negative log-posterior there (Laplace approximation) and give NUTS its
inverse as a *dense* mass matrix, adapting only the step size. Chains start from draws of the
Laplace approximation, so R-hat is meaningful.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Posterior", "SceneProblem", "find_map", "laplace", "run_laplace", "run_nuts",
           "run_svi", "pareto_k", "psis_resample", "run_nuts_pyro"]


@dataclass
class Posterior:
    """Posterior draws of the model's sites.

    Attributes
    ----------
    samples : dict name -> array (chain, draw, ...)
        Sample sites and deterministic sites (``latent``, ``position``).
    sample_stats : dict name -> array (chain, draw)
        Engine statistics (``lp``, ``diverging``, ``acceptance_rate``, ``tree_depth``, ...).
    method : str
    timings : dict
        Wall times in seconds.
    info : dict
        Anything else (Pareto k, step size, ESS-relevant settings, MAP value ...).
    """

    samples: dict
    sample_stats: dict
    method: str
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class SceneProblem:
    """Jitted log-density of one scene in the flat parameter space.

    The compiled functions take the scene's :class:`~probdeblend.model.SceneSpec` as a pytree
    argument and are cached per backend and shapes, so every scene with the same number of
    sources, bands and image / FFT size reuses them (no re-tracing in loops over scenes).

    Parameters
    ----------
    backend : probdeblend.model.Backend
        A NumPyro backend.
    spec : probdeblend.model.SceneSpec
    """

    def __init__(self, backend, spec):
        if backend.name != "numpyro":
            raise ValueError("SceneProblem needs the NumPyro backend (Backend.numpyro(prior))")
        from .model import scene_model

        self.backend, self.spec = backend, spec
        self.model = lambda: scene_model(backend, spec)
        S, D, B = spec.n_sources, spec.latent_dim, spec.n_bands
        self.template = {
            "latent_base": np.zeros((S, D), np.float32),
            "log_flux": np.zeros((S, B), np.float32),
            "offset": np.zeros((S, 2), np.float32),
        }
        self.dim = int(sum(v.size for v in self.template.values()))
        cache = backend.__dict__.setdefault("_compiled", {})
        key = spec.shape_key()
        if key not in cache:
            cache[key] = _compile(backend, self.template)
        self._fns = cache[key]
        self.unravel = self._fns["unravel"]

    def logp(self, flat):
        """Unnormalised log posterior of one flat vector."""
        return self._fns["logp"](flat, self.spec)

    def logp_and_grad(self, flat):
        return self._fns["logp_and_grad"](flat, self.spec)

    def hessian(self, flat):
        """Exact Hessian of log p at one flat vector (forward-over-reverse)."""
        return self._fns["hessian"](flat, self.spec)

    def gauss_newton(self, flat) -> np.ndarray:
        """Gauss-Newton approximation of the Hessian of *-log p* (positive semi-definite;
        float64), see ``gauss_newton`` in ``_compile``: several times cheaper than
        :meth:`hessian`, within a few percent of it in the posterior widths at the MAP."""
        return np.asarray(self._fns["gauss_newton"](np.asarray(flat, np.float32), self.spec),
                          np.float64)

    def fn(self, name: str):
        """A compiled helper (``decode``, ``model_image``, ``loglike_bands``), see ``_compile``."""
        return self._fns[name]

    def potential_fn(self):
        """``flat -> -log p`` closed over this scene (for NumPyro's ``NUTS(potential_fn=...)``)."""
        logp, spec = self._fns["logp"], self.spec
        return lambda flat: -logp(flat, spec)

    def flatten(self, params: dict) -> np.ndarray:
        """Flat float64 vector of a params dict with the template's keys."""
        from jax.flatten_util import ravel_pytree

        full = {k: np.asarray(params[k], np.float32).reshape(v.shape)
                for k, v in self.template.items()}
        return np.asarray(ravel_pytree(full)[0], dtype=np.float64)

    def flatten_draws(self, params: dict) -> np.ndarray:
        """Flat vectors (..., dim) of params with any leading dims (e.g. (chain, draw)).

        The order is that of ``jax.flatten_util.ravel_pytree`` on the template dict: keys
        sorted (``latent_base``, ``log_flux``, ``offset``), each raveled row-major.
        """
        parts = []
        for k in sorted(self.template):
            v = np.asarray(params[k], dtype=np.float64)
            lead = v.shape[: v.ndim - self.template[k].ndim]
            parts.append(v.reshape(lead + (-1,)))
        return np.concatenate(parts, -1)

    def unflatten(self, flat) -> dict:
        return {k: np.asarray(v) for k, v in self.unravel(np.asarray(flat, np.float32)).items()}

    def logp_batch(self, flats, batch: int = 50) -> np.ndarray:
        """log posterior (unnormalised) of many flat vectors (n, dim), in fixed-size batches."""
        flats = np.asarray(flats, np.float32)
        n = len(flats)
        out = np.empty(n)
        fn = self._fns["logp_batch"]
        for i in range(0, n, batch):
            chunk = flats[i:i + batch]
            pad = batch - len(chunk)
            if pad:  # keep one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            out[i:i + batch] = np.asarray(fn(chunk, self.spec))[: batch - pad]
        return out

    def log_prior_batch(self, flats) -> np.ndarray:
        """log prior (the model's sites, no likelihood) of flat vectors (n, dim): add the
        pixel log-likelihood (:func:`probdeblend.likelihood.chi2_loglike`) to get
        :meth:`logp_batch`."""
        fn = self._fns["log_prior_batch"]
        return np.asarray(fn(np.asarray(flats, np.float32), self.spec), np.float64)

    def deterministic(self, flats) -> dict:
        """``latent`` (…, S, D) and ``position`` (…, S, 2) of flat vectors (…, dim)."""
        import jax
        import jax.numpy as jnp

        flats = np.asarray(flats, np.float32)
        lead = flats.shape[:-1]
        params = jax.vmap(self.unravel)(flats.reshape(-1, self.dim))
        z = self._fns["from_base"](params["latent_base"],
                                   self.spec.magnitude(params["log_flux"], jnp))
        pos = np.asarray(self.spec.positions0)[None] + np.asarray(params["offset"])
        out = {k: np.asarray(v).reshape(lead + v.shape[1:]) for k, v in params.items()}
        out["latent"] = np.asarray(z).reshape(lead + z.shape[1:])
        out["position"] = pos.reshape(lead + pos.shape[1:])
        return out


def _compile(backend, template) -> dict:
    """Jitted log-density functions of ``scene_model`` for one backend and shape template."""
    import jax
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.util import log_density

    from .likelihood import loglike_per_band
    from .model import MAG_PER_LN, scene_model

    _, unravel = ravel_pytree(template)

    def logp(flat, spec):
        return log_density(lambda: scene_model(backend, spec), (), {}, unravel(flat))[0]

    def logp_shear(theta, spec):
        """log p of one scene whose galaxies are all sheared by ``theta[:2]``; ``theta[2:]``
        is the flat vector of its sites."""
        return log_density(lambda: scene_model(backend, spec, shear=theta[:2]), (), {},
                           unravel(theta[2:]))[0]

    def log_prior(flat, spec):
        """log p of the sites alone (the pixel likelihood factor hidden; its render is dead
        code that XLA drops)."""
        from numpyro import handlers

        model = handlers.block(lambda: scene_model(backend, spec), hide=["obs"])
        return log_density(model, (), {}, unravel(flat))[0]

    xp = backend.xp

    def model_image(z, log_flux, positions, spec):
        return spec.render(backend.decode(z), xp.exp(log_flux), positions, xp)

    def loglike_bands(z, log_flux, positions, spec):
        return loglike_per_band(model_image(z, log_flux, positions, spec), spec.image,
                                spec.sigma, spec.good, xp)

    def gauss_newton(flat, spec):
        """Gauss-Newton Hessian of -log p: ``J^T W J`` of the model image (W = the pixel
        weights) plus the exact Hessian of -log prior, in the flat order.

        ``J`` is built source by source: the decoder's Jacobian of each source's stamp with
        respect to its own latent base (forward mode, D tangents of one stamp) is rendered
        like a stamp (the renderer is linear in the stamps); a band's log flux scales that
        band's image; the offset is differentiated through the renderer alone. That is
        about D single-stamp tangents per source instead of the exact Hessian's
        forward-over-reverse pass of the whole scene per flat dimension (8 s against 0.5-1 s
        for a 4-source 80x80 scene on 2 CPU cores). It drops the residual-times-curvature term,
        which has zero mean at the MAP of a well-fitting model."""
        p = unravel(flat)
        positions = spec.positions0 + p["offset"]

        def one(u, lf, pos):
            mag = spec.magnitude(lf, xp)  # None, or a scalar that moves with lf

            def stamp(v, m=mag):
                return backend.decode(backend.from_base(v[None], None if m is None
                                                        else m[None]))[0]

            def image(st, q):
                return spec.render(st[None], xp.exp(lf)[None], q[None], xp)

            st = stamp(u)
            tangents = jax.lax.map(lambda t: jax.jvp(stamp, (u,), (t,))[1],
                                   xp.eye(u.shape[0], dtype=u.dtype), batch_size=4)
            j_u = jax.vmap(lambda t: image(t, pos))(tangents)  # (D, B, y, x)
            img = image(st, pos)
            j_f = xp.eye(lf.shape[0], dtype=img.dtype)[:, :, None, None] * img[None]
            if mag is not None:  # the conditioning band's flux also moves the morphology
                d_st = jax.jvp(lambda m: stamp(u, m), (mag,),
                               (xp.asarray(-MAG_PER_LN, mag.dtype),))[1]
                j_f = j_f.at[spec.mag_band].add(image(d_st, pos))
            j_p = xp.moveaxis(jax.jacfwd(lambda q: image(st, q))(pos), -1, 0)
            return j_u, j_f, j_p

        parts = jax.lax.map(lambda a: one(*a), (p["latent_base"], p["log_flux"], positions))
        J = xp.concatenate([j.reshape((-1,) + j.shape[2:]) for j in parts], 0)
        J = J.reshape(J.shape[0], -1)
        w = xp.where(spec.good, 1.0 / spec.sigma**2, 0.0).reshape(-1)
        return (J * w) @ J.T - jax.hessian(log_prior)(flat, spec)

    n_sources = template["latent_base"].shape[0]
    return {
        "gauss_newton": jax.jit(gauss_newton),
        "decode": jax.jit(backend.decode),
        "model_image": _over_draws(model_image, 3, n_sources),
        "loglike_bands": _over_draws(loglike_bands, 3, n_sources),
        "unravel": unravel,
        "logp": jax.jit(logp),
        "logp_and_grad": jax.jit(jax.value_and_grad(logp)),
        "hessian": jax.jit(jax.hessian(logp)),
        "logp_shear": jax.jit(logp_shear),
        "hessian_shear": jax.jit(jax.hessian(logp_shear)),
        "logp_batch": _over_draws(logp, 1, n_sources),
        "log_prior_batch": jax.jit(jax.vmap(log_prior, (0, None))),
        "from_base": jax.jit(backend.from_base),
    }


def _over_draws(fn, n_mapped: int, n_sources: int):
    """Jitted ``fn`` over a leading draw axis of its first ``n_mapped`` arguments (the rest,
    e.g. the spec, shared). On accelerators a ``vmap``; on CPU a ``lax.map`` in blocks of
    about :data:`~probdeblend.priors.jax_twin.CPU_DECODE_BLOCK` decoded stamps, where the
    decoder runs twice as fast as on one large batch (see ``JaxPrior._decode_flat``)."""
    import jax

    from .priors.jax_twin import CPU_DECODE_BLOCK

    if jax.default_backend() != "cpu":
        return jax.jit(jax.vmap(fn, (0,) * n_mapped + (None,)))

    block = max(1, CPU_DECODE_BLOCK // max(int(n_sources), 1))

    def mapped(*args):
        rest = args[n_mapped:]
        return jax.lax.map(lambda a: fn(*a, *rest), tuple(args[:n_mapped]), batch_size=block)

    return jax.jit(mapped)


def find_map(problem: SceneProblem, init: dict | None, max_iter: int = 500, tol: float = 1e-6,
             x0=None, bounds=None, precondition: str | None = None, restart_every: int = 100,
             min_eig: float = 0.25):
    """Maximum a posteriori by L-BFGS from ``init`` (a params dict) or from the flat vector
    ``x0``; ``bounds`` as in :func:`scipy.optimize.minimize` (L-BFGS-B). Returns (flat, info).

    ``precondition="gauss-newton"`` (scene problems, no ``bounds``): L-BFGS runs in the
    whitened coordinates ``y`` of ``x = x_start + T y``, ``T = H^{-1/2}`` from the
    Gauss-Newton Hessian ``H`` at the start (:meth:`SceneProblem.gauss_newton`, eigenvalues
    floored at ``min_eig``), where the posterior is close to isotropic. Fluxes known to 1 %
    next to latent directions known to order unity make the plain problem badly scaled: on
    80x80 LSST blends this takes 28-51 iterations where plain L-BFGS takes 120-230. Every
    ``restart_every`` iterations without convergence the Hessian is recomputed at the
    current point and L-BFGS restarts there (``info["map_restarts"]``).
    """
    from scipy.optimize import minimize

    if precondition not in (None, "gauss-newton") or (precondition and bounds is not None):
        from .errors import ArgumentError

        raise ArgumentError("precondition", precondition,
                            "precondition must be None or 'gauss-newton' (without bounds)")
    x = problem.flatten(init) if x0 is None else np.asarray(x0, np.float64)
    t0 = time.perf_counter()
    n_iter, restarts = 0, -1
    while n_iter < max_iter:
        restarts += 1
        T, start = None, x  # plain: L-BFGS on x itself; preconditioned: x = start + T y
        if precondition:
            w, V = np.linalg.eigh(problem.gauss_newton(x))
            T = V / np.sqrt(np.maximum(w, min_eig))

        def fun(y, start=start, T=T):
            val, g = problem.logp_and_grad(np.asarray(y if T is None else start + T @ y,
                                                      np.float32))
            g = -np.asarray(g, dtype=np.float64)
            return -float(val), (g if T is None else T.T @ g)

        cap = max_iter - n_iter if T is None else min(restart_every, max_iter - n_iter)
        res = minimize(fun, x if T is None else np.zeros_like(x), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": cap, "ftol": tol * 1e-3, "gtol": tol})
        x, n_iter = (res.x if T is None else start + T @ res.x), n_iter + int(res.nit)
        if T is None or res.success or res.nit < cap:  # converged, or stopped otherwise
            break
    info = {"map_logp": -float(res.fun), "map_iterations": n_iter,
            "map_success": bool(res.success), "map_time_s": time.perf_counter() - t0}
    if precondition:
        info["map_restarts"] = restarts
    return x, info


def laplace(problem: SceneProblem, flat_map, min_eig: float = 0.1,
            hessian: str = "gauss-newton"):
    """Covariance of the Laplace approximation at ``flat_map`` (inverse Hessian of -log p).

    ``hessian``: ``"gauss-newton"`` (default, :meth:`SceneProblem.gauss_newton`) or
    ``"exact"`` (:meth:`SceneProblem.hessian`, several times slower).

    The Hessian is made positive definite by taking the absolute value of its eigenvalues and
    flooring them at ``min_eig``: a direction of zero or negative curvature at the MAP (the
    likelihood can be locally non-convex in the latent) then gets a variance of at most
    ``1 / min_eig``, the scale of the priors (unit normal latent base, log-flux width 2, position
    width 1 px), instead of an unbounded one that would wreck NUTS's mass matrix.
    """
    if hessian == "gauss-newton":
        H = problem.gauss_newton(flat_map)
    elif hessian == "exact":
        H = -np.asarray(problem.hessian(np.asarray(flat_map, np.float32)), dtype=np.float64)
    else:
        from .errors import ArgumentError

        raise ArgumentError("hessian", hessian, "hessian must be 'gauss-newton' or 'exact'")
    return floored_inverse(H, min_eig)


def floored_inverse(H, min_eig: float = 0.1):
    """Inverse of a symmetrised Hessian of -log p with |eigenvalues| floored at ``min_eig``."""
    H = 0.5 * (np.asarray(H, np.float64) + np.asarray(H, np.float64).T)
    w, V = np.linalg.eigh(H)
    w = np.maximum(np.abs(w), min_eig)
    return (V / w) @ V.T


#: compiled NUTS loops, keyed by (logp function, warm-up, draws, tree depth, target accept)
_NUTS_RUNNERS: dict = {}


def _nuts_runner(logp, num_warmup: int, segment: int, max_tree_depth: int,
                 target_accept: float, vectorized: bool = True):
    """Jitted NUTS over a *whitened* scene posterior, in two functions: ``init(rng_key, u0,
    spec, mu, chol) -> state`` and ``advance(state, spec, mu, chol) -> (state, trace)``, which
    runs ``segment`` iterations (warm-up or sampling: the state counts them). Chain-vectorized
    (``jax.vmap`` over the chains' keys, starts and states) or one chain (``vectorized=False``;
    the caller loops).

    The scene (``spec``), the MAP ``mu`` and the Cholesky factor ``L`` of the Laplace covariance
    are traced arguments, so the loop compiles once per (number of sources, image shape) and is
    reused for every scene of that shape. Sampling ``u`` with ``x = mu + L u`` and a unit mass
    matrix is NUTS with the dense mass matrix ``L L^T``. Segments bound what one compiled call
    holds and let the caller show progress and stop on a time budget between them.
    """
    key = (logp, num_warmup, segment, max_tree_depth, float(target_accept), vectorized)
    if key in _NUTS_RUNNERS:
        return _NUTS_RUNNERS[key]
    import jax
    from numpyro.infer.hmc import hmc

    def potential_gen(spec, mu, chol):
        return lambda u: -logp(mu + chol @ u, spec)

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

    def init(rng_key, u0, spec, mu, chol):
        return init_kernel(u0, num_warmup, step_size=0.5, adapt_mass_matrix=False,
                           target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                           model_args=(spec, mu, chol), rng_key=rng_key)

    def advance(state, spec, mu, chol):
        def body(st, _):
            st = sample_kernel(st, model_args=(spec, mu, chol))
            return st, (st.z, st.potential_energy, st.diverging, st.accept_prob, st.num_steps)

        state, trace = jax.lax.scan(body, state, None, length=segment)
        return state, (mu + trace[0] @ chol.T,) + trace[1:]

    if vectorized:
        init = jax.vmap(init, in_axes=(0, 0, None, None, None))
        advance = jax.vmap(advance, in_axes=(0, None, None, None))
    # init must be traced before advance: sample_kernel reads settings that init_kernel sets
    runner = (jax.jit(init), jax.jit(advance))
    _NUTS_RUNNERS[key] = runner
    return runner


def _segment_length(total: int, longest: int = 25) -> int:
    """Iterations per compiled NUTS call: a divisor of ``total`` in [longest / 2, longest]
    when there is one (no wasted iterations), else ``longest`` (the last call's surplus
    iterations are dropped)."""
    for n in range(min(longest, total), max(longest // 2, 1) - 1, -1):
        if total % n == 0:
            return n
    return min(longest, total)


#: compiled NUTS executables, keyed by (runner, argument structure and shapes)
_NUTS_EXECUTABLES: dict = {}


def _compiled(runner, args):
    """The compiled executable of a jitted ``runner`` for ``args`` (ahead of time, cached by
    the arguments' tree structure, shapes and dtypes): compiling apart from running lets
    :func:`run_nuts` time the two separately (``timings["nuts_compile_s"]`` is 0 when a
    scene of the same shape compiled it before)."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (runner, tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__)))
                               for x in leaves))
    if key not in _NUTS_EXECUTABLES:
        _NUTS_EXECUTABLES[key] = runner.lower(*args).compile()
    return _NUTS_EXECUTABLES[key]


#: ``run_nuts``'s ``chain_method`` values
CHAIN_METHODS = ("auto", "vectorized", "threaded", "sequential")


def _cpu_threads() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def _chain_method(chain_method: str) -> str:
    """Resolve ``"auto"``: ``"vectorized"`` on an accelerator; on CPU ``"threaded"`` where the
    process may use two or more cores, else ``"sequential"`` (see :func:`run_nuts`)."""
    if chain_method not in CHAIN_METHODS:
        from .errors import ArgumentError

        raise ArgumentError("chain_method", chain_method,
                            "give 'auto', 'vectorized', 'threaded' or 'sequential'")
    if chain_method != "auto":
        return chain_method
    import jax

    if jax.default_backend() != "cpu":
        return "vectorized"
    return "threaded" if _cpu_threads() >= 2 else "sequential"


def _refuse_over_budget(problem: SceneProblem, flat, n_grad: int, max_seconds: float) -> None:
    """Raise :class:`~probdeblend.errors.BudgetExceededError` when ``n_grad`` evaluations of
    the log density and its gradient, timed at ``flat`` (best of 3, compiled already by the
    MAP), would take longer than ``max_seconds``."""
    x = np.asarray(flat, np.float32)
    problem.logp_and_grad(x)  # compiled (and warm) before timing
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        np.asarray(problem.logp_and_grad(x)[0])
        best = min(best, time.perf_counter() - t0)
    if n_grad * best > max_seconds:
        from .errors import BudgetExceededError

        raise BudgetExceededError(
            f"NUTS not started: at least {n_grad} gradient evaluations of {1e3 * best:.1f} ms, "
            f"{n_grad * best:.0f} s > max_seconds={max_seconds:g}. Raise the budget "
            f"(NutsConfig(max_seconds=...)), draw fewer samples, or use method='laplace'",
            argument="max_seconds", projected_s=n_grad * best, elapsed_s=0.0)


def run_nuts(problem: SceneProblem, flat_map, cov, num_warmup: int = 200,
             num_samples: int = 500, num_chains: int = 4, seed: int = 0,
             target_accept: float = 0.8, max_tree_depth: int = 8, progress: bool = False,
             chain_method: str = "auto", max_seconds: float | None = None,
             min_leapfrog: int = 12):
    """NUTS (NumPyro) with a dense mass matrix fixed to the Laplace covariance.

    Only the step size is adapted during warm-up (dual averaging, NumPyro's). Chains start at
    independent draws from the Laplace approximation (scaled by 0.5). ``chain_method``
    ``"vectorized"`` runs them in one ``vmap``-ed compiled loop: every NUTS iteration then
    costs the *longest* trajectory of the chains (they move in lock step), which an
    accelerator hides and a CPU pays; ``"threaded"`` runs one compiled chain per CPU core at
    a time, on Python threads (XLA releases the GIL; one 2-galaxy chain keeps only one core
    busy, so two cores sample two chains in about the time of one). Its memory: with one
    compiled call per chain (an earlier version) the process grew ~12 MB per second of
    sampling for 12 minutes; in segments it grows for the first ~90 s (two threads' buffers
    and allocator arenas, +0.8 GB over one chain at a time on a 3-galaxy scene) and then
    stays flat (2.0-2.2 GB over the next 340 s, where one chain at a time holds 1.3 GB).
    ``"sequential"`` runs one chain after the other. Threaded and sequential chains are
    identical (same keys and starts). ``"auto"`` (default): vectorized on an accelerator,
    threaded on a CPU with two or more cores for this process, else sequential.

    The loop runs in compiled segments of ~25 iterations (:func:`_segment_length`) that carry
    the sampler's state, reused across scenes with the same number of sources and image shape
    (the first call per shape pays the compilation, ~10-60 s on CPU, reported apart as
    ``timings["nuts_compile_s"]``; ``timings["nuts_s"]`` is the sampling alone).
    ``progress``: a tqdm bar over the iterations of all chains, moved once per segment.
    ``max_seconds``: a budget on the sampling time; after each segment the run time is
    projected from the segments done, and when the projection exceeds the budget the run
    stops and raises :class:`~probdeblend.errors.BudgetExceededError` (``projected_s``,
    ``elapsed_s``; a heavily blended scene is known after its first segment: the early
    warm-up's long trajectories took 28-61 s for 50 iterations on one core, hence short
    segments). Before compiling anything, chains that run on the CPU
    (sequential or threaded) are checked against the budget with a low prediction: every
    iteration of every chain at ``min_leapfrog`` gradient evaluations (the benchmark's
    2-galaxy scenes take 11-17 per draw after warm-up, more during it) at the measured cost
    of one; a run that cannot fit is refused at once (``elapsed_s`` 0), before it pays a
    compile and a first segment (up to a minute on one core). ``min_leapfrog=0`` turns the
    prediction off. Returns a
    :class:`Posterior` with draws of the flat sites plus the ``latent`` and ``position``
    deterministics.
    """
    import threading

    import jax
    import jax.numpy as jnp

    method = _chain_method(chain_method)
    vectorized = method == "vectorized"
    total = int(num_warmup) + int(num_samples)
    workers = min(num_chains, _cpu_threads()) if method == "threaded" else 1
    if max_seconds is not None and min_leapfrog > 0 and not vectorized:
        _refuse_over_budget(problem, flat_map, total * -(-num_chains // workers) * min_leapfrog,
                            max_seconds)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(len(cov)))
    u0 = jnp.asarray(0.5 * rng.standard_normal((num_chains, len(cov))), jnp.float32)
    seg = _segment_length(total)
    n_seg = -(-total // seg)
    init, advance = _nuts_runner(problem.fn("logp"), int(num_warmup), seg,
                                 int(max_tree_depth), target_accept, vectorized)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_chains)
    args = (problem.spec, jnp.asarray(flat_map, jnp.float32), jnp.asarray(chol, jnp.float32))
    starts = [(keys, u0)] if vectorized else [(keys[c], u0[c]) for c in range(num_chains)]
    t0 = time.perf_counter()
    exe_init = _compiled(init, starts[0] + args)
    exe_advance = _compiled(advance, (jax.eval_shape(init, *starts[0], *args),) + args)
    t_compile = time.perf_counter() - t0

    calls = n_seg * len(starts)  # compiled segment calls in the whole run
    done, stop, lock = [0], threading.Event(), threading.Lock()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=calls * seg * (num_chains if vectorized else 1), desc="NUTS",
                   unit="it", leave=False)
    t0 = time.perf_counter()

    def chain(start):  # one chain (or all, vectorized): its segments' traces
        state, parts = exe_init(*start, *args), []
        for _ in range(n_seg):
            if stop.is_set():
                return None
            state, trace = exe_advance(state, *args)
            parts.append(jax.tree_util.tree_map(np.asarray, trace))
            with lock:
                done[0] += 1
                if bar is not None:
                    bar.update(seg * (num_chains if vectorized else 1))
                elapsed = time.perf_counter() - t0
                if max_seconds is not None and elapsed * calls / done[0] > max_seconds:
                    stop.set()
                    return None
        axis = 1 if vectorized else 0  # the iterations' axis: (chain, iteration, ...)
        return (state.adapt_state.step_size,) + tuple(
            np.concatenate(p, axis=axis) for p in zip(*parts, strict=True))

    try:
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers, thread_name_prefix="nuts-chain") as pool:
                per = list(pool.map(chain, starts))
        else:
            per = [chain(st) for st in starts]
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    if stop.is_set():
        from .errors import BudgetExceededError

        projected = wall * calls / max(done[0], 1)
        raise BudgetExceededError(
            f"NUTS stopped after {wall:.0f} s: {done[0]} of {calls} segments of {seg} "
            f"iterations done, the whole run projected to take {projected:.0f} s > "
            f"max_seconds={max_seconds:g}. Raise the budget (NutsConfig(max_seconds=...)), "
            f"draw fewer samples, or use method='laplace'", argument="max_seconds",
            projected_s=projected, elapsed_s=wall)
    if vectorized:
        step, *out = per[0]
    else:
        step = np.stack([np.asarray(p[0]) for p in per])
        out = [np.stack([p[i] for p in per]) for i in range(1, len(per[0]))]
    x, pe, div, acc, num_steps = (np.asarray(o)[:, num_warmup:total] for o in out)
    samples = problem.deterministic(x.astype(np.float64))
    stats = {
        "lp": -pe.astype(np.float64),
        "diverging": div.astype(bool),
        "acceptance_rate": acc.astype(np.float64),
        "n_steps": num_steps,
        "tree_depth": np.floor(np.log2(np.maximum(num_steps, 1))).astype(int) + 1,
    }
    info = {"step_size": np.asarray(step).tolist(), "num_warmup": num_warmup,
            "num_chains": num_chains, "mean_leapfrog_steps": float(num_steps.mean()),
            "chain_method": method, "segment": seg}
    return Posterior(samples, stats, "nuts", {"nuts_compile_s": t_compile, "nuts_s": wall},
                     info)


#: compiled SVI loops, keyed by (logp function, steps, learning rate, particles)
_SVI_RUNNERS: dict = {}


def _svi_runner(logp, num_steps: int, lr: float, num_particles: int):
    """A jitted SVI loop (Adam on the reparameterised ELBO) for a full-rank Gaussian guide
    ``x = loc + L eps`` (``L`` lower triangular, positive diagonal) in the flat space.

    The scene is a traced argument, so the loop compiles once per shape (see
    :func:`_nuts_runner`)."""
    key = (logp, num_steps, float(lr), num_particles)
    if key in _SVI_RUNNERS:
        return _SVI_RUNNERS[key]
    import jax
    import jax.numpy as jnp
    from numpyro.optim import Adam

    opt = Adam(lr)

    def tril(params):
        low = jnp.tril(params["off"], -1)
        return low + jnp.diag(jnp.exp(params["log_diag"]))

    def loss(params, rng_key, spec, mu0, chol0):
        chol = tril(params)
        eps = jax.random.normal(rng_key, (num_particles, params["loc"].shape[0]))
        y = params["loc"] + eps @ chol.T
        energy = -jnp.mean(jax.vmap(logp, (0, None))(mu0 + y @ chol0.T, spec))
        return energy - jnp.sum(params["log_diag"])  # minus the entropy (up to a constant)

    def run(params, rng_key, spec, mu0, chol0):
        def body(state, k):
            value, grad = jax.value_and_grad(loss)(opt.get_params(state), k, spec, mu0, chol0)
            return opt.update(grad, state), value

        state, losses = jax.lax.scan(body, opt.init(params), jax.random.split(rng_key, num_steps))
        return opt.get_params(state), losses

    runner = jax.jit(run)
    _SVI_RUNNERS[key] = runner
    return runner


def run_svi(problem: SceneProblem, flat_init, cov_init, num_steps: int = 1000,
            num_samples: int = 1000, lr: float = 1e-2, seed: int = 0, progress: bool = False,
            num_particles: int = 4, init_scale: float = 0.1):
    """SVI with a full-rank Gaussian guide, preconditioned by an initial Gaussian
    (``flat_init``, ``cov_init``), e.g. the amortized posterior or the Laplace approximation.

    The guide lives in the whitened coordinates ``y`` of the initial Gaussian
    (``x = flat_init + L0 y``, ``L0 L0^T = cov_init``): ``q(y) = N(loc, L L^T)``, started at
    ``loc = 0``, ``L = init_scale I``. Whitening by the initial guess is what keeps Adam stable
    on the badly scaled scene posterior (fluxes known to 1 %, latents to ~1); the small initial
    scale keeps the first ELBO estimates out of the far tails. The ELBO is maximised with Adam
    (learning rate ``lr``, ``num_particles`` reparameterised draws per step) in one compiled loop
    that is reused for every scene of the same shape.
    ``progress`` is accepted for API symmetry (the compiled loop has no progress bar). Returns a
    :class:`Posterior` with one chain of ``num_samples`` guide draws; ``info`` has the ELBO
    trace (nats, up to the constant of the data).
    """
    import jax
    import jax.numpy as jnp

    chol0 = np.linalg.cholesky(cov_init + 1e-10 * np.eye(len(cov_init)))
    dim = len(flat_init)
    params = {"loc": jnp.zeros(dim, jnp.float32), "off": jnp.zeros((dim, dim), jnp.float32),
              "log_diag": jnp.full(dim, np.log(init_scale), jnp.float32)}
    runner = _svi_runner(problem.fn("logp"), int(num_steps), lr, int(num_particles))
    t0 = time.perf_counter()
    params, losses = jax.block_until_ready(runner(
        params, jax.random.PRNGKey(seed), problem.spec, jnp.asarray(flat_init, jnp.float32),
        jnp.asarray(chol0, jnp.float32)))
    wall = time.perf_counter() - t0
    # back to the flat space: x = flat_init + L0 (loc + L eps)
    loc = np.asarray(flat_init, np.float64) + chol0 @ np.asarray(params["loc"], np.float64)
    tril = chol0 @ (np.tril(np.asarray(params["off"], np.float64), -1) + np.diag(
        np.exp(np.asarray(params["log_diag"], np.float64))))
    rng = np.random.default_rng(seed)
    flats = loc[None] + rng.standard_normal((num_samples, len(loc))) @ tril.T
    samples = problem.deterministic(flats[None])
    lp = problem.logp_batch(flats)[None]
    losses = np.asarray(losses)
    return Posterior(samples, {"lp": lp}, "svi", {"svi_s": wall},
                     {"elbo": (-losses).tolist()[:: max(1, num_steps // 200)],
                      "final_elbo": float(-losses[-50:].mean())})


def psis_resample(log_weights, num_samples: int, rng: np.random.Generator):
    """Pareto-smoothed importance resampling (Vehtari et al. 2024, ArviZ ``psislw``).

    Returns ``(index, k_hat, ess)``: ``num_samples`` indices drawn with the smoothed normalised
    weights (systematic resampling: the fewest duplicates for given weights), the Pareto shape
    ``k_hat`` and the effective sample size ``1 / sum(w^2)`` of the smoothed weights.
    """
    slw, k = _psis(log_weights)
    w = np.exp(slw - slw.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    u = (rng.uniform() + np.arange(num_samples)) / num_samples
    idx = np.minimum(np.searchsorted(np.cumsum(w), u), len(w) - 1)
    return rng.permutation(idx), float(np.asarray(k)), float(ess)


def run_laplace(problem: SceneProblem, flat_map, num_samples: int = 1000, seed: int = 0,
                proposal: str = "t", df: float = 7.0, n_proposals: int | None = None,
                cov=None, k_max: float = 0.7, min_eig: float = 0.25,
                pilot_fraction: float = 0.25, pilot_k_max: float = 1.0,
                compute_lp: bool = True, hessian: str = "gauss-newton"):
    """Laplace approximation at the MAP refined by Pareto-smoothed importance sampling.

    Proposal: the Laplace Gaussian ``N(map, cov)`` or a multivariate Student-t with ``df``
    degrees of freedom and the same scale matrix (heavier tails: the importance weights stay
    bounded where the posterior is wider than the Laplace curvature says). ``n_proposals``
    draws (default ``max(num_samples, 400)``) are weighted by ``p / q`` with the scene's
    log-density, Pareto-smoothed and resampled to ``num_samples``. ``info["pareto_k"]`` is the
    scene's k-hat (< 0.7: the draws are reliable; Vehtari et al. 2024), ``info["ess"]`` the
    effective sample size of the weights, ``info["unique_fraction"]`` the fraction of distinct
    draws. When k-hat exceeds ``k_max`` the weights cannot be trusted and resampling would
    return few distinct draws: the plain Laplace (Gaussian) draws are returned instead, with
    ``method`` saying so (never a collapsed posterior). ``min_eig`` floors the curvature of the
    Hessian's eigen-directions (default 1/4: the weakest prior curvature, a log-flux width of
    2), see :func:`laplace`. Returns a :class:`Posterior` with ``samples["flat"]`` (draw, dim).

    Each proposal costs one evaluation of the scene's log density (a render of every source),
    and in 80-160 dimensions k-hat mostly exceeds 0.7 (37 of 40 benchmark scenes). So the
    weights of a pilot (the first ``pilot_fraction`` of the proposals) are checked first: if
    its k-hat exceeds ``pilot_k_max`` the rest are not evaluated and the Laplace draws are
    returned (``info["pareto_k_pilot"]``; ``info["pareto_k"]`` is then the pilot's). A pilot
    cannot certify k-hat < 0.7 (that needs the full set), only that the weights are hopeless:
    ``pilot_fraction`` 1 turns the pilot off. ``compute_lp=False``: the fallback draws get no
    ``lp`` (one more render per draw; :meth:`probdeblend.ScenePosterior.to_inference_data`
    derives it from the log-likelihood that it computes for every draw anyway). ``hessian``:
    the curvature of the Laplace covariance, see :func:`laplace`.
    """
    from scipy.special import gammaln

    if proposal not in ("t", "gaussian"):
        from .errors import ArgumentError

        raise ArgumentError("proposal", proposal, "proposal must be 't' or 'gaussian'")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    mu = np.asarray(flat_map, np.float64)
    cov = laplace(problem, mu, min_eig, hessian) if cov is None else np.asarray(cov, np.float64)
    t_cov = time.perf_counter() - t0
    d = len(mu)
    L = np.linalg.cholesky(cov + 1e-12 * np.eye(d))
    n = int(n_proposals or max(num_samples, 400))
    eps = rng.standard_normal((n, d))
    if proposal == "t":
        chi = rng.chisquare(df, size=(n, 1))
        u = eps * np.sqrt(df / chi)
        maha = np.sum(u**2, -1)
        log_q = (gammaln((df + d) / 2) - gammaln(df / 2) - 0.5 * d * np.log(df * np.pi)
                 - 0.5 * (df + d) * np.log1p(maha / df))
    else:
        u = eps
        log_q = -0.5 * np.sum(u**2, -1) - 0.5 * d * np.log(2 * np.pi)
    log_q = log_q - np.sum(np.log(np.diag(L)))
    x = mu[None] + u @ L.T
    t1 = time.perf_counter()
    n_pilot = min(n, max(100, int(np.ceil(pilot_fraction * n))))
    log_p = problem.logp_batch(x[:n_pilot])
    info = {"n_proposals": n, "proposal": proposal}
    if n_pilot < n:
        k_pilot = pareto_k(log_p - log_q[:n_pilot])
        info["pareto_k_pilot"] = k_pilot
        if k_pilot > pilot_k_max:  # hopeless weights: skip the rest of the proposals
            info["n_proposals"] = n_pilot
        else:
            log_p = np.concatenate([log_p, problem.logp_batch(x[n_pilot:])])
    n_eval = len(log_p)
    idx, k, ess = psis_resample(log_p - log_q[:n_eval], int(num_samples), rng)
    info.update(pareto_k=k, ess=ess, unique_fraction=float(len(np.unique(idx)) / len(idx)))
    timings = {"laplace_cov_s": t_cov, "psis_s": time.perf_counter() - t1}
    if k <= k_max and n_eval == n:
        return Posterior({"flat": x[idx]}, {"lp": log_p[idx]}, "laplace+psis", timings, info)
    xg = mu[None] + rng.standard_normal((int(num_samples), d)) @ L.T
    info["unique_fraction"] = 1.0
    stats = {"lp": problem.logp_batch(xg)} if compute_lp else {}
    return Posterior({"flat": xg}, stats, "laplace (PSIS k-hat > "
                     f"{k_max}: unweighted Laplace draws)", timings, info)


def pareto_k(log_weights) -> float:
    """Pareto-smoothed importance-sampling shape k-hat of log importance weights (ArviZ PSIS).

    k < 0.5: reliable; 0.5-0.7: usable; > 0.7: the proposal misses the target.
    """
    return _psis(log_weights)[1]


def _psis(log_weights):
    """ArviZ ``psislw`` of log weights (non-finite ones get weight 0): ``(smoothed, k_hat)``."""
    import arviz as az

    lw = np.asarray(log_weights, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slw, k = az.psislw(lw - lw[np.isfinite(lw)].max())
    return slw, float(np.asarray(k))


def run_nuts_pyro(problem: SceneProblem, flat_map, cov, num_warmup: int = 200,
                  num_samples: int = 500, num_chains: int = 2, seed: int = 0,
                  target_accept: float = 0.8, max_tree_depth: int = 8, progress: bool = False):
    """The same preconditioned NUTS as :func:`run_nuts`, with Pyro on the torch model.

    Runs the Pyro twin of ``problem``'s scene model (same spec, torch prior) with one dense
    mass-matrix block over all sites set to the Laplace covariance; chains run one after the
    other in this process. Slower than NumPyro on CPU; there for users who live in Pyro.
    """
    import pyro
    import torch
    from pyro.infer import MCMC, NUTS

    from .model import Backend, scene_model

    backend = Backend.pyro(problem.backend.torch_prior)
    spec = problem.spec.with_arrays(backend.asarray)
    sites = tuple(sorted(problem.template))
    inv_mass = torch.as_tensor(np.asarray(cov), dtype=torch.float32)

    class _PreconditionedNUTS(NUTS):
        def setup(self, warmup_steps, *args, **kwargs):
            super().setup(warmup_steps, *args, **kwargs)
            self.mass_matrix_adapter.inverse_mass_matrix = {sites: inv_mass}

    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(cov + 1e-12 * np.eye(len(cov)))
    chains, t0 = [], time.perf_counter()
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        x0 = flat_map + 0.5 * (L @ rng.standard_normal(len(cov)))
        init = {k: torch.as_tensor(v, dtype=torch.float32)
                for k, v in problem.unflatten(x0).items()}
        kernel = _PreconditionedNUTS(lambda: scene_model(backend, spec), full_mass=[sites],
                                     adapt_mass_matrix=False, target_accept_prob=target_accept,
                                     max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup,
                    initial_params=init, disable_progbar=not progress)
        mcmc.run()
        chains.append({k: v.detach().numpy() for k, v in mcmc.get_samples().items()
                       if k in problem.template})
    wall = time.perf_counter() - t0
    samples = {k: np.stack([ch[k] for ch in chains]) for k in problem.template}
    flats = problem.flatten_draws(samples)
    det = problem.deterministic(flats)
    lp = problem.logp_batch(flats.reshape(-1, problem.dim)).reshape(flats.shape[:2])
    return Posterior(det, {"lp": lp}, "nuts-pyro", {"nuts_s": wall},
                     {"num_warmup": num_warmup, "num_chains": num_chains})
