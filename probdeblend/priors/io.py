"""Saving and loading learned priors: a safetensors weight file plus a JSON model card.

A prior called ``NAME`` is two files side by side:

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

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ChecksumMismatchError, PriorLoadError, UnknownBandError
from .distribution import LearnedPrior
from .flow import LatentFlow
from .frame import ModelFrame
from .nets import Decoder, Encoder

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
]

#: Keys every model card must have.
REQUIRED_CARD_KEYS = (
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
)
_KINDS = ("vae", "vaegan")
_FORMAT_VERSION = 1


# -- locations ---------------------------------------------------------------------------------
def shipped_priors_dir() -> Path:
    """Folder holding the shipped priors.

    In order: the ``PROBDEBLEND_PRIORS_DIR`` environment variable; the package resource
    ``probdeblend._shipped_priors`` (the repository's top-level ``priors/`` folder, mapped to that
    package when installed); the ``priors/`` folder at the root of a source checkout.
    """
    env = os.environ.get("PROBDEBLEND_PRIORS_DIR")
    if env:
        return Path(env).expanduser()
    try:
        from importlib.resources import files

        res = files("probdeblend._shipped_priors")
        path = Path(str(res))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "priors"


def list_priors(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the priors (a card and its weights) in ``directory`` (default: shipped ones)."""
    d = Path(directory) if directory is not None else shipped_priors_dir()
    return list_weight_files(d, exclude_kinds=_OTHER_KINDS)


#: Card ``kind`` values of non-prior models stored next to the priors (see
#: :mod:`probdeblend.amortized`); :func:`list_priors` leaves them out.
_OTHER_KINDS = ("amortized",)


def list_weight_files(directory, kinds=None, exclude_kinds=()) -> list[str]:
    """Names of the ``<name>.json`` + ``<name>.safetensors`` pairs in ``directory``.

    ``kinds`` keeps only cards whose ``kind`` is one of them; ``exclude_kinds`` drops cards whose
    ``kind`` is one of them (a card that cannot be read is kept unless ``kinds`` is given).
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    names = []
    for p in sorted(d.glob("*.json")):
        if not p.with_suffix(".safetensors").is_file():
            continue
        if kinds is not None or exclude_kinds:
            try:
                kind = json.loads(p.read_text()).get("kind")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                kind = None
            if kinds is not None and kind not in kinds:
                continue
            if kind is not None and kind in exclude_kinds:
                continue
        names.append(p.stem)
    return names


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(name_or_path, what: str = "prior", available=None) -> tuple[Path, Path]:
    """``(card_path, weights_path)`` of a prior name or path, or raise PriorLoadError.

    ``what`` names the kind of model in messages; ``available(directory)`` lists the shipped
    names offered when nothing is found (default :func:`list_priors`).
    """
    raw = os.fspath(name_or_path)
    p = Path(raw).expanduser()
    is_name = (
        isinstance(name_or_path, str)
        and os.sep not in raw
        and "/" not in raw
        and (p.suffix not in (".json", ".safetensors"))
    )
    candidates = []
    if is_name:
        candidates.append(shipped_priors_dir() / raw)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    candidates.append(stem)
    for c in candidates:
        card, weights = Path(str(c) + ".json"), Path(str(c) + ".safetensors")
        if card.is_file():
            if not weights.is_file():
                raise PriorLoadError(
                    f"{what} {raw!r}: the model card {card} exists but its weights {weights} are "
                    f"missing; restore the .safetensors file next to the card (re-download or "
                    f"re-generate the {what})"
                )
            return card, weights
    shipped = shipped_priors_dir()
    names = (available or list_priors)(shipped)
    looked = ", ".join(str(Path(str(c) + ".json")) for c in candidates)
    raise PriorLoadError(
        f"{what} {raw!r} not found (looked for {looked}). Shipped {what}s available in "
        f"{shipped}: {names if names else 'none'}. Pass one of these names, a path to a "
        f"{what}'s .json card / .safetensors weights / their common stem, or set "
        f"PROBDEBLEND_PRIORS_DIR to the folder holding your priors."
    )


# -- cards -------------------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, ModelFrame):
        return obj.to_dict()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # JSON has no NaN/inf
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in a JSON model card")


def read_card(name_or_path) -> dict:
    """The model card of a prior (no weights loaded, no checksum verified)."""
    card_path, _ = _resolve(name_or_path)
    return _read_card_file(card_path)


def _read_json_card(
    card_path: Path, required=(), what: str = "prior", writer: str = "save_prior"
) -> dict:
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PriorLoadError(
            f"model card {card_path} is not readable JSON ({e}); re-download or "
            f"re-generate the {what}"
        ) from e
    if not isinstance(card, dict):
        raise PriorLoadError(
            f"model card {card_path} must hold a JSON object, got {type(card).__name__}"
        )
    missing = [k for k in required if k not in card]
    if missing:
        raise PriorLoadError(
            f"model card {card_path} is missing the keys {missing} (required: "
            f"{list(required)}); re-generate the card with {writer}"
        )
    return card


def _read_card_file(card_path: Path) -> dict:
    card = _read_json_card(card_path, REQUIRED_CARD_KEYS)
    if card["kind"] not in _KINDS:
        raise PriorLoadError(
            f"model card {card_path}: kind must be one of {_KINDS}, got {card['kind']!r}"
        )
    if card["latent_prior"] not in ("flow", "normal"):
        raise PriorLoadError(
            f"model card {card_path}: latent_prior must be 'flow' or 'normal', "
            f"got {card['latent_prior']!r}"
        )
    arch = card["architecture"]
    for key in ("encoder", "decoder"):
        if not isinstance(arch, dict) or not isinstance(arch.get(key), dict):
            raise PriorLoadError(
                f"model card {card_path}: architecture.{key} is missing; "
                f"re-generate the card with save_prior"
            )
    return card


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
    p = Path(path).expanduser()
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    stem.parent.mkdir(parents=True, exist_ok=True)
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
        raise ValueError(f"card['kind'] must be one of {_KINDS}, got {kind!r}")
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

    return _write_pair(stem, tensors, out, {"format": "pt", "probdeblend_prior": out["name"]})


def _stem(path) -> Path:
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _write_pair(stem: Path, tensors: dict, out: dict, metadata: dict) -> Path:
    """Write ``stem.safetensors`` and the card ``out`` (+ sha256, size) as ``stem.json``.

    Both files are first written under temporary names and then renamed.
    """
    weights = Path(str(stem) + ".safetensors")
    card_path = Path(str(stem) + ".json")
    tag = f".tmp-{os.getpid()}"
    tmp_w, tmp_c = Path(str(weights) + tag), Path(str(card_path) + tag)
    try:
        save_file(tensors, str(tmp_w), metadata=metadata)
        os.chmod(tmp_w, 0o644)  # safetensors creates the file owner-only
        out["sha256"] = file_sha256(tmp_w)
        out["file_size_bytes"] = tmp_w.stat().st_size
        tmp_c.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp_w, weights)
        os.replace(tmp_c, card_path)
    finally:
        for t in (tmp_w, tmp_c):
            if t.exists():
                t.unlink()
    return card_path


def save_weights(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], card: Mapping
) -> Path:
    """Write any named tensors plus a JSON card as ``<stem>.safetensors`` / ``<stem>.json``.

    The generic form of :func:`save_prior` (used by :mod:`probdeblend.amortized`): ``card`` is
    stored as given (converted to JSON types; ``sha256`` and ``file_size_bytes`` of the weight
    file are computed and added), ``card["name"]`` defaults to the file stem. The two files are
    written under temporary names and renamed, so an interrupted save leaves nothing half
    written. Returns the card's path.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {k: v for k, v in dict(card).items() if k not in ("sha256", "file_size_bytes")}
    out.setdefault("name", stem.name)
    out = _jsonable(out)  # fail before writing anything
    flat = {str(k): v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", "probdeblend_model": str(out["name"])}
    return _write_pair(stem, flat, out, meta)


def _verify_checksum(
    card: dict, card_path: Path, weights_path: Path, writer: str, what: str = "prior"
) -> None:
    digest = file_sha256(weights_path)
    if digest != card["sha256"]:
        raise ChecksumMismatchError(
            f"weights {weights_path} have sha256 {digest} but the model card {card_path} records "
            f"{card['sha256']}: the file is corrupted or does not belong to this card. "
            f"Re-download the {what} (or re-generate it with {writer}); do not edit weights "
            f"or checksums by hand."
        )


def _read_tensors(weights_path: Path, what: str = "prior") -> dict:
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise PriorLoadError(
            f"cannot read weights {weights_path} ({e}); re-download or re-generate the {what}"
        ) from e


def load_weights(
    name_or_path: str | os.PathLike, required_keys=("name",), what: str = "model", available=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``<stem>.safetensors`` + ``<stem>.json`` pair written by :func:`save_weights`.

    ``name_or_path`` is a name in :func:`shipped_priors_dir` or a path (card, weights or stem),
    as for :func:`load_prior`. The card must hold ``required_keys`` and the weights' sha256 must
    match the card's. Returns ``(tensors, card)``.

    Raises
    ------
    PriorLoadError
        Missing files, unreadable card or weights, missing card keys.
    ChecksumMismatchError
        The weights' sha256 differs from the card's.
    """
    card_path, weights_path = _resolve(name_or_path, what=what, available=available)
    required = tuple(dict.fromkeys(tuple(required_keys) + ("sha256", "file_size_bytes")))
    card = _read_json_card(card_path, required, what=what, writer="save_weights")
    _verify_checksum(card, card_path, weights_path, writer="save_weights", what=what)
    return _read_tensors(weights_path, what=what), card


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
    """
    card_path, weights_path = _resolve(name_or_path)
    card = _read_card_file(card_path)
    _verify_checksum(card, card_path, weights_path, writer="save_prior")
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
                f"prior {card['name']!r} has no band(s) {missing}; its bands are "
                f"{list(frame.bands)}. Request a subset of those, or use a prior trained on "
                f"these bands"
            )
    tensors = _read_tensors(weights_path)
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
    return LearnedPrior(
        encoder, decoder, flow, frame, card=card, bands=bands, validate_args=validate_args
    )


def _ctor(cfg: Mapping, keys) -> dict:
    missing = [
        k for k in keys if k not in cfg and k not in ("s_max", "n_layers", "hidden", "channels")
    ]
    if missing:
        raise KeyError(f"architecture entry lacks {missing}")
    out = {k: cfg[k] for k in keys if k in cfg}
    if "channels" in out:
        out["channels"] = tuple(out["channels"])
    return out


def machine_description() -> dict:
    """Machine facts recorded in training cards."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
