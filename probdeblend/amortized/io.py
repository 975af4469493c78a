"""Saving, listing and loading amortized encoders (safetensors + checksummed model card).

See :mod:`probdeblend.amortized` for the conventions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import PriorLoadError
from ..priors.frame import ModelFrame
from ..priors.io import load_weights
from .constants import _FORMAT_VERSION, _REQUIRED_CARD_KEYS, KIND
from .network import AmortizedEncoder


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def _architecture(model: AmortizedEncoder) -> dict:
    return {
        **model.config(),
        "input": (
            "cutout_input: asinh(image_b / sigma_b / softening) * valid_b per band, plus a "
            "coverage plane; sigma_b = sqrt(median variance of the cutout)"
        ),
        "band_features": "log(sigma_b) - mean_b log(sigma_b), log(psf_fwhm_b [pixels])",
        "outputs": {
            "z": "latent of the prior (loc, log_scale)",
            "log_flux": "ln(total flux per band) in the scene's flux unit (loc, log_scale)",
            "offset": "(dx, dy) pixels from the cutout centre (loc, log_scale)",
        },
    }


def save_amortized(stem, model: AmortizedEncoder, card: Mapping) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (model card with sha256); return the card.

    ``card`` must give ``frame`` (the prior's :class:`ModelFrame` or its dict) and ``prior``
    (``{"name": ..., "sha256": ...}``); ``name`` defaults to the stem; ``training``, ``data``
    and ``validation`` are stored as given. ``kind``, ``architecture`` and ``format_version``
    are filled in.
    """
    from ..priors.io import save_weights

    card = dict(card)
    for key in ("frame", "prior"):
        if key not in card:
            raise PriorLoadError(f"card must give {key!r} (see save_amortized)")
    frame = (
        card["frame"]
        if isinstance(card["frame"], ModelFrame)
        else ModelFrame.from_dict(card["frame"])
    )
    if frame.n_bands != model.n_bands:
        raise PriorLoadError(
            f"card['frame'] has {frame.n_bands} bands {list(frame.bands)} but the encoder has "
            f"{model.n_bands}"
        )
    arch = _architecture(model)
    arch.update(card.pop("architecture", {}) or {})
    out = {
        "format_version": _FORMAT_VERSION,
        "name": card.pop("name", Path(stem).name),
        "kind": KIND,
        "architecture": arch,
        "frame": frame.to_dict(),
        "prior": dict(card.pop("prior")),
        "training": card.pop("training", {}),
        "data": card.pop("data", {}),
        "validation": card.pop("validation", {}),
    }
    card.pop("frame")
    card.pop("kind", None)
    out.update(card)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    return save_weights(stem, tensors, out)


def list_amortized(directory=None) -> list[str]:
    """Names of the amortized models in ``directory`` (default: the shipped priors folder)."""
    from ..priors.io import list_weight_files, shipped_priors_dir

    d = Path(directory) if directory is not None else shipped_priors_dir()
    return list_weight_files(d, kinds=(KIND,))


def read_amortized(name_or_path) -> tuple[AmortizedEncoder, ModelFrame, dict]:
    """Read an amortized encoder saved by :func:`save_amortized`: ``(network, frame, card)``.

    ``name_or_path``: a name in the shipped priors folder (``"lsst-vae-amortized"``) or the
    path of the card, the weights or their stem. The weights' sha256 is checked against the
    card (:class:`~probdeblend.errors.ChecksumMismatchError`).
    """
    tensors, card = load_weights(
        name_or_path, ("name", "kind"), what="amortized model", available=list_amortized
    )
    where = card.get("name", str(name_or_path))
    if card["kind"] != KIND:
        raise PriorLoadError(
            f"{where!r} is a {card['kind']!r} model, not an amortized encoder; load priors with "
            f"probdeblend.load_prior"
        )
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise PriorLoadError(
            f"the model card of {where!r} is missing the keys {missing}; re-generate it with "
            f"save_amortized"
        )
    try:
        frame = ModelFrame.from_dict(card["frame"])
        model = AmortizedEncoder.from_config(card["architecture"])
        sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(sd, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PriorLoadError(
            f"amortized model {where!r}: weights do not fit the card's architecture / frame "
            f"({e}); the card and weights must come from the same save_amortized call"
        ) from e
    return model, frame, card
