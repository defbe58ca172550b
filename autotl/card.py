"""The model card ``model.json`` that sits beside ``model.onnx``.

It carries everything needed to use the ONNX file without autotl's training side: the class
names (in output order), the exact eval preprocessing (timm's ``resolve_data_config`` keys),
where the weights came from, what was measured and how the model was made. Torch-free: the
predict path loads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from autotl._io import atomic_write_json
from autotl._version import __version__
from autotl.errors import AutotlError

__all__ = ["ModelCard", "card_path_for", "load_run_card", "estimate_line", "datl_prior", "preprocessing_from_data_config", "CARD_NAME", "PREPROCESSING_KEYS"]

CARD_NAME = "model.json"
#: The keys of timm's ``resolve_data_config`` (all required in a card but ``crop_mode``).
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_REQUIRED_PREPROCESSING = ("input_size", "interpolation", "mean", "std", "crop_pct")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
_FIX = "restore the model.json written with the model, or fit it again with `autotl fit`"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def preprocessing_from_data_config(data_config: Mapping[str, Any]) -> dict:
    """timm data config (``resolve_data_config``) -> the card's plain-JSON ``preprocessing`` dict."""
    out = {}
    keys = [k for k in PREPROCESSING_KEYS if k in data_config] + [k for k in data_config if k not in PREPROCESSING_KEYS]
    for key in keys:
        value = data_config[key]
        if isinstance(value, (tuple, list)):
            value = [v.item() if hasattr(v, "item") else v for v in value]
        elif hasattr(value, "item"):
            value = value.item()
        out[key] = value
    out.setdefault("crop_mode", "center")
    if out.get("crop_pct") is None:
        out["crop_pct"] = 0.875  # timm's DEFAULT_CROP_PCT, what create_transform uses for None
    return out


def datl_prior(scoring: Mapping[str, Any] | None, model_label: str, strategies: Mapping[str, Any] | None) -> str | None:
    """Which P_s the DATL weights w = P_t / P_s of the card's model used, in words: the source pool's
    class distribution when retrieval trained on a pool with DATL weights, else the scoring prior
    (uniform for an ImageNet head without bundled class counts, which only ranks models then)."""
    retrieval = (strategies or {}).get("retrieval") or {}
    used = str(retrieval.get("source_weights") or "")
    if used.startswith("datl"):
        return f"the source pool's class distribution ({retrieval.get('pool_images')} images); weights the source loss"
    for row in (scoring or {}).get("models") or []:
        if row.get("model") == model_label and (row.get("datl") or {}).get("prior"):
            where = "source-loss weights uniform: " + used if used else "no source pool: DATL ranks models only"
            return f"{row['datl']['prior']} ({where})"
    return None


@dataclass
class ModelCard:
    """Everything about an exported model, saved as JSON next to the ONNX file."""

    classes: list[str]
    preprocessing: dict
    source_model: dict = field(default_factory=dict)  # {"name", "weights_origin", ...}
    frozen_stages: int | None = None
    metrics: dict = field(default_factory=dict)  # {"val": {...}, "test": {...}}, each with its "role"
    # the headline: accuracy on new images with a 95 % interval and how it was computed (autotl.estimate)
    estimate: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # TrainConfig, stages, what each strategy did
    data: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    autotl_version: str = __version__
    created: str = field(default_factory=_utc_now)  # ISO 8601 date-time, UTC
    extra: dict = field(default_factory=dict)
    # sha256 of the model file this card describes: predict refuses a model that is not it (a model
    # and a card from two runs, e.g. a fit interrupted between writing them)
    model_sha256: str = ""

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.preprocessing = preprocessing_from_data_config(self.preprocessing)

    # ------------------------------------------------------------------ (de)serialisation

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the card atomically; raises ValueError if it would not load back."""
        problem = _problem(self.to_json())
        if problem:
            raise ValueError(f"invalid model card: {problem}")
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "model card") -> "ModelCard":
        problem = _problem(d)
        if problem:
            raise AutotlError(f"model card {source}: {problem}; {_FIX}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}  # from a newer autotl: keep them
        if unknown:
            kwargs["extra"] = {**unknown, **dict(kwargs.get("extra") or {})}
        return cls(**kwargs)

    def headline(self) -> str | None:
        """"estimate for new images: 91.2 % (95 % interval 85.0–95.1 %, cross-validated, 40 images)";
        None for a card without an estimate."""
        line = estimate_line(self.estimate)
        return f"estimate for new images: {line}" if line else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelCard":
        """Read and validate a card; every problem is an ``AutotlError`` naming the file and the fix."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AutotlError(f"model card {path} not found; {_FIX}") from None
        except IsADirectoryError:
            raise AutotlError(f"model card {path} is a directory, not a JSON file; {_FIX}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AutotlError(f"model card {path} cannot be read ({exc}); {_FIX}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AutotlError(
                f"model card {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {_FIX}"
            ) from None
        return cls.from_dict(d, source=path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(d: Any) -> str | None:
    """What makes ``d`` unusable as a card (None when it is fine)."""
    if not isinstance(d, Mapping):
        return f"expected a JSON object, got {type(d).__name__}"
    missing = [k for k in ("classes", "preprocessing") if k not in d]
    if missing:
        return "missing required key " + ", ".join(repr(k) for k in missing)
    classes = d["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return "'classes' must be a non-empty list of class names"
    if len(set(classes)) != len(classes):
        return "'classes' has duplicate names"
    pre = d["preprocessing"]
    if not isinstance(pre, Mapping):
        return "'preprocessing' must be an object"
    missing = [k for k in _REQUIRED_PREPROCESSING if k not in pre]
    if missing:
        return "'preprocessing' lacks " + ", ".join(repr(k) for k in missing)
    size = pre["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return f"'preprocessing.input_size' must be [C, H, W] positive integers, got {size!r}"
    channels = size[0]
    for key in ("mean", "std"):
        v = pre[key]
        if not (isinstance(v, (list, tuple)) and len(v) == channels and all(_is_number(x) for x in v)):
            return f"'preprocessing.{key}' must be {channels} numbers, got {v!r}"
    if any(x == 0 for x in pre["std"]):
        return "'preprocessing.std' must not contain 0"
    if pre["interpolation"] not in INTERPOLATIONS:
        return f"'preprocessing.interpolation' must be one of {', '.join(INTERPOLATIONS)}, got {pre['interpolation']!r}"
    crop_pct = pre["crop_pct"]
    if crop_pct is not None and not (_is_number(crop_pct) and crop_pct > 0):
        return f"'preprocessing.crop_pct' must be a positive number, got {crop_pct!r}"
    crop_mode = pre.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        return f"'preprocessing.crop_mode' must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}"
    for key in ("source_model", "metrics", "training", "data", "parity", "extra"):
        if d.get(key) is not None and not isinstance(d[key], Mapping):
            return f"'{key}' must be an object"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_model_matches(card: "ModelCard", model_path: str | os.PathLike, card_path: str | os.PathLike) -> None:
    """``AutotlError`` unless ``model_path`` is the file ``card`` was written for, or the int8 model the
    card lists as kept (cards without a hash, from autotl 0.1, are trusted)."""
    int8 = card.extra.get("int8") if isinstance(card.extra.get("int8"), Mapping) else {}
    known = {card.model_sha256, int8.get("sha256") if int8.get("kept") else None} - {None, ""}
    if card.model_sha256 and file_sha256(model_path) not in known:
        raise AutotlError(f"{model_path} is not the model its card {card_path} describes (the two come from different "
                          "runs: a fit was interrupted between writing them); run the same `autotl fit` again, "
                          "with --resume for a search")


def estimate_line(estimate: Any) -> str | None:
    """A card's ``estimate`` in one line (``autotl.estimate.Estimate.line``); None when there is none."""
    from autotl.estimate import Estimate

    if not isinstance(estimate, Mapping) or estimate.get("accuracy") is None:
        return None
    return Estimate(**{k: estimate.get(k) for k in ("accuracy", "low", "high", "kind", "method", "n_images")}).line()


def load_run_card(path: str | os.PathLike) -> ModelCard:
    """The card of a run folder or of a model file (``autotl info RUN``)."""
    path = Path(path)
    if not path.exists():
        raise AutotlError(f"{path}: no such run folder or model file; give a run folder (the --out of `autotl fit`) "
                          "or its model.onnx")
    return ModelCard.load(path / CARD_NAME if path.is_dir() else card_path_for(path))


def card_path_for(onnx_path: str | os.PathLike) -> Path:
    """The card of ``foo.onnx``: ``foo.json`` beside it if that exists, else ``model.json`` there."""
    onnx_path = Path(onnx_path)
    own = onnx_path.with_suffix(".json")
    if own.is_file():
        return own
    return onnx_path.parent / CARD_NAME
