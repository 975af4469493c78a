"""Saving and loading learned priors (the factory over :mod:`.store`).

:func:`load_prior` reads a prior's files through the artifact store (:mod:`.store`: lookup,
card schema, sha256 check), builds the torch networks (:mod:`.nets`, :mod:`.flow`) and returns
them as a :class:`~.distribution.LearnedPrior`; :func:`save_prior` is the inverse. A prior
called ``NAME`` is two files side by side:

``NAME.safetensors``
    Every tensor of the networks, named as in their ``state_dict`` with a prefix:
    ``encoder.*``, ``decoder.*`` and, when the prior has a latent flow, ``flow.*``. The VAE-GAN
    discriminator is a training-only network and is not shipped.
``NAME.json``
    The model card, with keys

    ``name``
        Prior name (``"lsst-vae"``).
    ``kind``
        ``"vae"`` or ``"vaegan"``.
    ``architecture``
        ``latent_dim``, ``channels``, ``n_bands``, ``stamp_size`` and the constructor arguments
        of ``encoder``, ``decoder`` and ``flow`` (``null`` without a flow), plus a description
        of the encoder input and decoder output transforms.
    ``frame``
        :meth:`ModelFrame.to_dict` of the model frame.
    ``latent_prior``
        ``"flow"`` (the latent flow's density) or ``"normal"`` (``N(0, I)``).
    ``training``
        Training recipe: epochs, batch size, optimiser, learning rate and schedule, KL weight,
        seed, numbers of training / validation galaxies, wall time, throughput, torch version,
        machine...
    ``data``
        Simulation recipe of the training set (free-form, from the caller).
    ``validation``
        Validation metrics (free-form, from the caller; may be empty).
    ``sha256``, ``file_size_bytes``
        Of the safetensors file; checked on load.

:func:`load_prior` accepts a shipped prior name (see :func:`shipped_priors_dir` and
:func:`list_priors`), or a path to the card, the weights or their common stem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    NotAPriorError,
    PriorLoadError,
    UnknownBandError,
)
from ..training import machine_description
from . import store
from .distribution import LearnedPrior
from .flow import LatentFlow
from .frame import ModelFrame
from .nets import Decoder, Encoder
from .store import (
    REQUIRED_CARD_KEYS,
    file_sha256,
    list_weight_files,
    save_weights,
    shipped_priors_dir,
)

__all__ = [
    "REQUIRED_CARD_KEYS",
    "save_prior",
    "load_prior",
    "read_card",
    "list_priors",
    "shipped_priors_dir",
    "file_sha256",
    "save_weights",
    "load_weights",
    "list_weight_files",
    "machine_description",
]

_KINDS = store.PRIOR_KINDS
_FORMAT_VERSION = 1

#: Card ``kind`` values of non-prior models stored next to the priors (see
#: :mod:`probdeblend.amortized`); :func:`list_priors` leaves them out.
_OTHER_KINDS = ("amortized",)

# names kept for callers of the pre-store layout (benchmarks/validate_priors.py)
_resolve = store.resolve_files
_jsonable = store.to_jsonable
_stem = store.stem_of


def list_priors(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the priors (a card and its weights) in ``directory`` (default: shipped ones)."""
    d = Path(directory) if directory is not None else shipped_priors_dir()
    return list_weight_files(d, exclude_kinds=_OTHER_KINDS)


def read_card(name_or_path) -> dict:
    """The model card of a prior (no weights loaded, no checksum verified)."""
    card_path, _ = store.resolve_files(name_or_path, available=list_priors)
    return store.read_prior_card(card_path)


def load_weights(
    name_or_path: str | os.PathLike, required_keys=("name",), what: str = "model", available=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`.store.load_weights` returning torch tensors (for ``load_state_dict``)."""
    arrays, card = store.load_weights(name_or_path, required_keys, what, available)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, card


# -- save --------------------------------------------------------------------------------------
def _architecture(encoder: Encoder, decoder: Decoder, flow: LatentFlow | None) -> dict:
    return {
        "latent_dim": decoder.latent_dim,
        "channels": list(decoder.channels),
        "n_bands": decoder.n_bands,
        "stamp_size": decoder.stamp_size,
        "encoder": encoder.config(),
        "decoder": decoder.config(),
        "flow": flow.config() if flow is not None else None,
        "encoder_input": "asinh(n_pix * image / sum(image)) per band",
        "decoder_output": "softmax over the pixels of each band (each band sums to 1)",
    }


def save_prior(
    path: str | os.PathLike,
    encoder: Encoder,
    decoder: Decoder,
    flow: LatentFlow | None,
    card: Mapping,
) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` and return the card's path.

    Parameters
    ----------
    path : path-like
        Stem of the two files (a trailing ``.json`` / ``.safetensors`` is dropped).
    encoder, decoder : Encoder, Decoder
    flow : LatentFlow or None
        ``None`` writes a prior with ``latent_prior = "normal"``.
    card : mapping
        Model card entries: ``frame`` (a :class:`ModelFrame` or its dict) is required;
        ``name`` (default: the file stem), ``kind`` (default ``"vae"``), ``training``,
        ``data`` and ``validation`` (default ``{}``) are taken as given; ``architecture``
        entries are merged over the ones derived from the networks. ``latent_prior``,
        ``sha256`` and ``file_size_bytes`` are computed.

    Both files are first written under temporary names and then renamed, so an interrupted
    save never leaves a half-written prior.
    """
    stem = store.stem_of(path)
    card = dict(card)
    if "frame" not in card:
        raise PriorLoadError("card must give the model frame: card['frame'] = ModelFrame(...)")
    frame = (
        card["frame"]
        if isinstance(card["frame"], ModelFrame)
        else ModelFrame.from_dict(card["frame"])
    )
    if frame.n_bands != decoder.n_bands or frame.stamp_size != decoder.stamp_size:
        raise PriorLoadError(
            f"card['frame'] has {frame.n_bands} bands and {frame.stamp_size}-pixel stamps but the "
            f"decoder has {decoder.n_bands} bands and {decoder.stamp_size}-pixel stamps"
        )
    kind = card.get("kind", "vae")
    if kind not in _KINDS:
        raise ArgumentError("card", kind, f"card['kind'] must be one of {_KINDS}, got {kind!r}")
    arch = _architecture(encoder, decoder, flow)
    arch.update(card.get("architecture", {}))
    out = {
        "format_version": _FORMAT_VERSION,
        "name": card.get("name", stem.name),
        "kind": kind,
        "architecture": arch,
        "frame": frame.to_dict(),
        "latent_prior": "flow" if flow is not None else "normal",
        "training": card.get("training", {}),
        "data": card.get("data", {}),
        "validation": card.get("validation", {}),
    }
    for k, v in card.items():
        if k not in out and k not in ("sha256", "file_size_bytes"):
            out[k] = v
    out = _jsonable(out)  # fail before writing anything

    tensors = {}
    for prefix, m in (("encoder", encoder), ("decoder", decoder), ("flow", flow)):
        if m is None:
            continue
        for k, v in m.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous().clone()

    meta = {"format": "pt", "probdeblend_prior": out["name"]}
    return store.write_pair(stem, tensors, out, meta)


# -- load --------------------------------------------------------------------------------------
def load_prior(
    name_or_path: str | os.PathLike,
    bands=None,
    validate_args: bool | None = None,
) -> LearnedPrior:
    """Load a learned prior as a Pyro distribution (:class:`LearnedPrior`).

    Parameters
    ----------
    name_or_path : str or path-like
        A shipped prior name (``"lsst-vae"``; see :func:`list_priors`), or the path of a prior's
        ``.json`` card, ``.safetensors`` weights or their common stem.
    bands : sequence of str, optional
        Decode only these bands, in this order. Each must be one of the prior's bands.
    validate_args : bool, optional
        Passed to the distribution (checks that values given to ``log_prob`` are finite).

    Raises
    ------
    PriorLoadError
        Missing files (the message lists the shipped priors), unreadable card or missing card
        keys, weights that do not fit the card's architecture.
    ChecksumMismatchError
        The weights' sha256 differs from the card's.
    UnknownBandError
        A requested band is not one of the prior's bands.
    NotAPriorError
        The name or path is another kind of model, e.g. an amortized encoder
        (``"lsst-vae-amortized"``).
    ArgumentTypeError, ArgumentError
        ``name_or_path``, ``bands`` or ``validate_args`` has the wrong type or is empty.
    """
    _check_load_args(name_or_path, bands, validate_args)
    try:
        card_path, weights_path = store.resolve_files(name_or_path, available=list_priors)
    except PriorLoadError as e:  # not found: record which argument was at fault
        e.argument, e.value = "name_or_path", os.fspath(name_or_path)
        raise
    kind = store.read_json_card(card_path).get("kind")
    if kind in _OTHER_KINDS:
        raise NotAPriorError(
            f"name_or_path: {os.fspath(name_or_path)!r} is an {kind} encoder (card "
            f"{card_path}), not a prior; load_prior needs a prior such as "
            f"{list_priors()}. fit(prior=...) finds the matching amortized encoder itself",
            argument="name_or_path", value=os.fspath(name_or_path),
        )
    card = store.read_prior_card(card_path)
    store.verify_checksum(card, card_path, weights_path, writer="save_prior")
    try:
        frame = ModelFrame.from_dict(card["frame"])
    except (KeyError, TypeError, ValueError) as e:
        raise PriorLoadError(
            f"model card {card_path}: invalid frame {card['frame']!r} ({e})"
        ) from e
    if bands is not None:
        bands = (bands,) if isinstance(bands, str) else tuple(bands)
        missing = [b for b in bands if b not in frame.bands]
        if missing:
            raise UnknownBandError(
                f"bands: prior {card['name']!r} has no band(s) {missing}; its bands are "
                f"{list(frame.bands)}. Request a subset of those, or use a prior trained on "
                f"these bands",
                argument="bands", value=missing,
            )
    tensors = {k: torch.from_numpy(v) for k, v in store.read_weights(weights_path).items()}
    arch = card["architecture"]
    try:
        encoder = Encoder(
            **_ctor(arch["encoder"], ("n_bands", "stamp_size", "latent_dim", "channels"))
        )
        decoder = Decoder(
            **_ctor(arch["decoder"], ("n_bands", "stamp_size", "latent_dim", "channels"))
        )
        flow = None
        if card["latent_prior"] == "flow":
            if not arch.get("flow"):
                raise PriorLoadError(
                    f"model card {card_path}: latent_prior is 'flow' but architecture.flow is empty"
                )
            flow = LatentFlow(**_ctor(arch["flow"], ("dim", "n_layers", "hidden", "s_max")))
            if arch["flow"].get("context"):
                flow.attach_context(arch["flow"]["context"])
        for prefix, m in (("encoder", encoder), ("decoder", decoder), ("flow", flow)):
            if m is None:
                continue
            sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            m.load_state_dict(sd, strict=True)
    except PriorLoadError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PriorLoadError(
            f"weights {weights_path} do not fit the architecture in {card_path} ({e}); the card "
            f"and weights must come from the same save_prior call"
        ) from e
    if frame.n_bands != decoder.n_bands:
        raise PriorLoadError(
            f"model card {card_path}: frame has {frame.n_bands} bands, decoder {decoder.n_bands}"
        )
    declared = arch.get("latent_dim")
    actual = {"encoder": encoder.latent_dim, "decoder": decoder.latent_dim}
    if flow is not None:
        actual["flow"] = flow.dim
    if declared is not None and any(v != declared for v in actual.values()):
        raise PriorLoadError(
            f"model card {card_path}: architecture.latent_dim is {declared!r} but the weights "
            f"have latent dimensions {actual}; the card was edited or belongs to other "
            f"weights: restore the card written by save_prior",
            argument="name_or_path", value=os.fspath(name_or_path),
        )
    return LearnedPrior(
        encoder, decoder, flow, frame, card=card, bands=bands, validate_args=validate_args
    )


def _check_load_args(name_or_path, bands, validate_args) -> None:
    """Type checks of :func:`load_prior`'s arguments, before any file is read."""
    if isinstance(name_or_path, bytes) or not isinstance(name_or_path, (str, os.PathLike)):
        raise ArgumentTypeError(
            "name_or_path", name_or_path,
            f"must be a prior name or path, got {name_or_path!r} "
            f"({type(name_or_path).__name__}); pass a shipped prior name such as 'lsst-vae' "
            f"(see list_priors()) or the path of a prior's .json card",
        )
    if not os.fspath(name_or_path).strip():
        raise ArgumentError("name_or_path", name_or_path,
                            "is empty; pass a shipped prior name such as 'lsst-vae'")
    if bands is not None and not isinstance(bands, str):
        try:
            items = list(bands)
        except TypeError:
            items = None
        if items is None or not items or not all(isinstance(b, str) for b in items):
            raise ArgumentTypeError(
                "bands", bands,
                f"must be None, a band name or a non-empty sequence of band names such as "
                f"('g', 'r', 'i'), got {bands!r}",
            )
    if validate_args is not None and not isinstance(validate_args, bool):
        raise ArgumentTypeError("validate_args", validate_args,
                                f"must be None, True or False, got {validate_args!r}")


def _ctor(cfg: Mapping, keys) -> dict:
    missing = [
        k for k in keys if k not in cfg and k not in ("s_max", "n_layers", "hidden", "channels")
    ]
    if missing:
        raise KeyError(f"architecture entry lacks {missing}")  # protocol: caught by load_prior
    out = {k: cfg[k] for k in keys if k in cfg}
    if "channels" in out:
        out["channels"] = tuple(out["channels"])
    return out
