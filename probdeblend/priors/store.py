"""Artifact store of learned models: safetensors weights + a checksummed JSON model card.

A leaf module (numpy, safetensors and :mod:`probdeblend.errors` only; no torch, no JAX): the
torch prior (:mod:`.io`, :mod:`.distribution`), the amortized encoder
(:mod:`probdeblend.amortized`) and the benchmarks all read and write their files here, and
nothing here imports them back.

A model called ``NAME`` is two files side by side:

``NAME.safetensors``
    Named tensors. A prior stores its networks' ``state_dict`` entries with a prefix
    (``encoder.*``, ``decoder.*`` and, with a latent flow, ``flow.*``); the shipped files
    predate the networks' semantic export names (:meth:`~.nets.Decoder.export_weights`) and are
    kept byte for byte, so their checksums still hold.
``NAME.json``
    The model card: a JSON object. Every card holds ``name``, ``sha256`` and ``file_size_bytes``
    (of the weights, written by :func:`write_pair` and checked by :func:`verify_checksum` before
    any weight is read). A prior's card also has the keys in :data:`REQUIRED_CARD_KEYS`
    (schema in :func:`read_prior_card` and in :mod:`.io`).

Lookup: a bare name is looked up in :func:`shipped_priors_dir` (the repository's top-level
``priors/`` folder, or ``PROBDEBLEND_PRIORS_DIR``); anything else is a path to the card, the
weights or their common stem (:func:`resolve_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..atomic import fsync_file
from ..errors import ArgumentTypeError, ChecksumMismatchError, PriorLoadError

__all__ = [
    "REQUIRED_CARD_KEYS",
    "PRIOR_KINDS",
    "shipped_priors_dir",
    "list_weight_files",
    "file_sha256",
    "resolve_files",
    "to_jsonable",
    "read_json_card",
    "read_prior_card",
    "write_pair",
    "save_weights",
    "read_weights",
    "verify_checksum",
    "load_weights",
]

#: Keys every prior's model card must have.
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
#: Card ``kind`` values of priors; other kinds (e.g. ``"amortized"``) share the folder.
PRIOR_KINDS = ("vae", "vaegan")


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

        path = Path(str(files("probdeblend._shipped_priors")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "priors"


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


def stem_of(path: str | os.PathLike) -> Path:
    """``path`` without a trailing ``.json`` / ``.safetensors``."""
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def resolve_files(
    name_or_path, what: str = "prior", available: Callable[[Path], list[str]] | None = None
) -> tuple[Path, Path]:
    """``(card_path, weights_path)`` of a model name or path, or raise :class:`PriorLoadError`.

    ``what`` names the kind of model in messages; ``available(directory)`` lists the shipped
    names offered when nothing is found (default: every pair in the folder).
    """
    raw = os.fspath(name_or_path)
    p = Path(raw).expanduser()
    is_name = (
        isinstance(name_or_path, str)
        and os.sep not in raw
        and "/" not in raw
        and (p.suffix not in (".json", ".safetensors"))
    )
    candidates = [shipped_priors_dir() / raw] if is_name else []
    candidates.append(stem_of(p))
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
    names = (available or list_weight_files)(shipped)
    looked = ", ".join(str(Path(str(c) + ".json")) for c in candidates)
    raise PriorLoadError(
        f"{what} {raw!r} not found (looked for {looked}). Shipped {what}s available in "
        f"{shipped}: {names if names else 'none'}. Pass one of these names, a path to a "
        f"{what}'s .json card / .safetensors weights / their common stem, or set "
        f"PROBDEBLEND_PRIORS_DIR to the folder holding your priors."
    )


# -- cards -------------------------------------------------------------------------------------
def to_jsonable(obj):
    """``obj`` with numpy / torch values, paths and ``to_dict()`` objects turned into JSON types.

    Non-finite Python floats become strings (JSON has no NaN / inf); anything else that JSON
    cannot hold raises TypeError.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ModelFrame, configs
        return to_jsonable(obj.to_dict())
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor, without importing torch
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise ArgumentTypeError(
        "card", obj, f"cannot store {type(obj).__name__} {obj!r} in a JSON model card"
    )


def read_json_card(
    card_path: Path, required=(), what: str = "prior", writer: str = "save_prior"
) -> dict:
    """The JSON object in ``card_path``, with the ``required`` keys, or raise PriorLoadError."""
    try:
        card = json.loads(Path(card_path).read_text())
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


def read_prior_card(card_path: Path) -> dict:
    """A prior's card, checked against the schema (:data:`REQUIRED_CARD_KEYS`, ``kind`` in
    :data:`PRIOR_KINDS`, ``latent_prior`` ``"flow"`` / ``"normal"``, ``architecture.encoder`` /
    ``.decoder`` present). No weights are read and no checksum is verified."""
    card = read_json_card(card_path, REQUIRED_CARD_KEYS)
    if card["kind"] not in PRIOR_KINDS:
        raise PriorLoadError(
            f"model card {card_path}: kind must be one of {PRIOR_KINDS}, got {card['kind']!r}"
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


# -- weights -----------------------------------------------------------------------------------
def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def write_pair(stem: Path, tensors: Mapping, card: dict, metadata: dict) -> Path:
    """Write ``stem.safetensors`` and ``card`` (+ its ``sha256``, ``file_size_bytes``) as
    ``stem.json``; return the card's path.

    ``tensors`` maps names to numpy arrays or torch tensors. Both files are first written under
    temporary names and then renamed, so an interrupted save never leaves a half-written model.
    ``card`` must already hold JSON types (:func:`to_jsonable`); it is updated in place.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(str(stem) + ".safetensors")
    card_path = Path(str(stem) + ".json")
    tag = f".tmp-{os.getpid()}"
    tmp_w, tmp_c = Path(str(weights) + tag), Path(str(card_path) + tag)
    arrays = {str(k): _to_numpy(v) for k, v in tensors.items()}
    try:
        save_file(arrays, str(tmp_w), metadata={str(k): str(v) for k, v in metadata.items()})
        os.chmod(tmp_w, 0o644)  # safetensors creates the file owner-only
        card["sha256"] = file_sha256(tmp_w)
        card["file_size_bytes"] = tmp_w.stat().st_size
        tmp_c.write_text(json.dumps(card, indent=2) + "\n")
        fsync_file(tmp_w)  # on disk before the renames: a crash never leaves a fragment
        fsync_file(tmp_c)
        os.replace(tmp_w, weights)
        os.replace(tmp_c, card_path)
    finally:
        for t in (tmp_w, tmp_c):
            if t.exists():
                t.unlink()
    return card_path


def save_weights(path: str | os.PathLike, tensors: Mapping, card: Mapping) -> Path:
    """Write any named tensors plus a JSON card as ``<stem>.safetensors`` / ``<stem>.json``.

    ``card`` is stored as given (converted to JSON types; ``sha256`` and ``file_size_bytes`` of
    the weight file are computed and added), ``card["name"]`` defaults to the file stem. Written
    atomically (:func:`write_pair`). Returns the card's path.
    """
    stem = stem_of(path)
    out = {k: v for k, v in dict(card).items() if k not in ("sha256", "file_size_bytes")}
    out.setdefault("name", stem.name)
    out = to_jsonable(out)  # fail before writing anything
    meta = {"format": "pt", "probdeblend_model": str(out["name"])}
    return write_pair(stem, tensors, out, meta)


def verify_checksum(
    card: dict, card_path: Path, weights_path: Path, writer: str, what: str = "prior"
) -> None:
    """Raise :class:`ChecksumMismatchError` unless the weights' sha256 is the card's."""
    digest = file_sha256(weights_path)
    if digest != card["sha256"]:
        raise ChecksumMismatchError(
            f"weights {weights_path} have sha256 {digest} but the model card {card_path} records "
            f"{card['sha256']}: the file is corrupted or does not belong to this card. "
            f"Re-download the {what} (or re-generate it with {writer}); do not edit weights "
            f"or checksums by hand."
        )


def read_weights(weights_path: Path, what: str = "prior") -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy arrays (no checksum check: see
    :func:`verify_checksum`)."""
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise PriorLoadError(
            f"cannot read weights {weights_path} ({e}); re-download or re-generate the {what}"
        ) from e


def load_weights(
    name_or_path: str | os.PathLike, required_keys=("name",), what: str = "model", available=None
) -> tuple[dict[str, np.ndarray], dict]:
    """Read a ``<stem>.safetensors`` + ``<stem>.json`` pair written by :func:`save_weights`.

    ``name_or_path`` as for :func:`resolve_files`. The card must hold ``required_keys`` and the
    weights' sha256 must match the card's (checked before reading them). Returns
    ``(arrays, card)`` with numpy arrays.

    Raises
    ------
    PriorLoadError
        Missing files, unreadable card or weights, missing card keys.
    ChecksumMismatchError
        The weights' sha256 differs from the card's.
    """
    card_path, weights_path = resolve_files(name_or_path, what=what, available=available)
    required = tuple(dict.fromkeys(tuple(required_keys) + ("sha256", "file_size_bytes")))
    card = read_json_card(card_path, required, what=what, writer="save_weights")
    verify_checksum(card, card_path, weights_path, writer="save_weights", what=what)
    return read_weights(weights_path, what=what), card
