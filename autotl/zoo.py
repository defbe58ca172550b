"""Which source models a fit tries when none is named: the packaged ones, and the hub zoo.

The packaged EfficientNet-Lite0/1/2 weights (pip packages) work offline and are always candidates.
``HUB_ZOO`` is a short list of modern timm backbones whose ImageNet top-1 is well above theirs
(transfer accuracy tracks it: Kornblith et al. 2019), each justified from published figures in
the README's model-zoo table. Each has a *tier*: ``cpu`` (its CPU throughput is within about 2x
of EfficientNet-Lite2's, so CPU minutes afford it) or ``gpu`` (only a GPU's throughput affords it).

``--models`` (``zoo``) chooses:

* ``auto`` (the default): the packaged models, plus the hub models of the device's tiers (``cpu``;
  on CUDA ``cpu`` and ``gpu``) whose weights are in the local Hugging Face cache or can be
  downloaded now. When some cannot be had (offline, ``HF_HUB_OFFLINE=1``, a failed download) one
  line says so and the fit goes on with the rest;
* ``packaged``: the packaged models only (never looks at the hub);
* ``hub``: the hub models of the device's tiers only (an error when none can be had);
* ``all``: the packaged models and every hub model, whatever the device.

Reachability is checked cheaply: ``HF_HUB_OFFLINE=1`` means offline, without a request; else a
metadata request with a short timeout, which also gives the size of each download, logged before
it starts. Downloads go through timm's ``pretrained=True`` (huggingface_hub shows the progress);
cached weights are read from the cache without a request (``autotl.models.cached_hub_file``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch-free import: options.py reads ZOO_CHOICES
    from .models import SourceModel

__all__ = ["ZOO_CHOICES", "HubModel", "HUB_ZOO", "hub_tiers", "hub_offline", "zoo_models"]

ZOO_CHOICES = ("auto", "packaged", "hub", "all")
TIERS = ("cpu", "gpu")
#: Seconds the reachability / size request may take before the hub counts as unreachable.
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class HubModel:
    """One hub backbone: its timm name with the pretrained tag, and the tier that affords it."""

    name: str
    tier: str  # "cpu" or "gpu"


#: The figures behind each choice are in README.md ("Model zoo"); the order is the tier's order.
HUB_ZOO: tuple[HubModel, ...] = (
    HubModel("mobilenetv4_hybrid_medium.e200_r256_in12k_ft_in1k", "cpu"),
    HubModel("convnext_nano.in12k_ft_in1k", "cpu"),
    HubModel("convnext_tiny.in12k_ft_in1k", "gpu"),
    HubModel("tf_efficientnetv2_s.in21k_ft_in1k", "gpu"),
    HubModel("vit_small_patch16_224.augreg_in21k_ft_in1k", "gpu"),
)


def hub_tiers(device: Any = None) -> tuple[str, ...]:
    """The tiers a device affords: ``cpu``; on a CUDA device ``cpu`` and ``gpu``."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    return TIERS if kind == "cuda" else ("cpu",)


def hub_offline() -> str | None:
    """Why the hub is not to be asked (``HF_HUB_OFFLINE``), or None."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if env in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return None


def _size(nbytes: int | None) -> str:
    return "size unknown" if nbytes is None else f"{nbytes / 1e6:.0f} MB"


def _download_size(name: str, timeout: float) -> int | None:
    """Bytes of the file timm would download for ``name`` (raises when the hub does not answer)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    from .models import hub_weight_files

    repo, files = hub_weight_files(name) or (None, [])
    for filename in files:
        try:
            return get_hf_file_metadata(hf_hub_url(repo, filename), timeout=timeout).size
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            continue  # timm tries the next file name too
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100]}" if text else type(exc).__name__


def zoo_models(zoo: str = "auto", device: Any = None, *, hub: Sequence[HubModel] = HUB_ZOO,
               timeout: float = PROBE_TIMEOUT) -> list["SourceModel"]:
    """The loaded candidate models ``zoo`` (``ZOO_CHOICES``) selects for ``device`` (see the module
    docstring); ``hub`` is the list of hub models to choose from."""
    from . import _console
    from .errors import AutotlError
    from .models import DEFAULT_MODEL, cached_hub_file, create_source_model, list_packaged_models

    if zoo not in ZOO_CHOICES:
        raise AutotlError(f"--models {zoo!r}: use one of {', '.join(ZOO_CHOICES)}")
    packaged = list_packaged_models() if zoo != "hub" else []
    tiers = TIERS if zoo == "all" else hub_tiers(device)
    wanted = [m.name for m in hub if m.tier in tiers] if zoo != "packaged" else []

    cached = {name: cached_hub_file(name) for name in wanted}
    to_fetch = [name for name in wanted if cached[name] is None]
    missing: dict[str, str] = {}  # hub model -> why it is not a candidate
    why_not = f"the hub is offline ({why})" if to_fetch and (why := hub_offline()) else None
    sizes: dict[str, int | None] = {}
    for name in to_fetch:
        if why_not is None:
            try:
                sizes[name] = _download_size(name, timeout)
                continue
            except Exception as exc:  # noqa: BLE001 - no answer in time: the hub is unreachable, ask no more
                why_not = f"the hub is unreachable ({_reason(exc)})"
        missing[name] = f"not in the local Hugging Face cache and {why_not}"
    if sizes:
        known = [n for n in sizes.values() if n is not None]
        _console.log("downloading from the Hugging Face hub: " + ", ".join(f"{n} ({_size(b)})" for n, b in sizes.items())
                     + (f"; {_size(sum(known))} in all" if len(sizes) > 1 and known else "")
                     + " (--models packaged: no download)", markup=False, soft_wrap=True)

    loaded = [create_source_model(name) for name in packaged]
    for name in wanted:
        if name in missing:
            continue
        try:
            loaded.append(create_source_model(name))
        except AutotlError as exc:  # a failed download: the other candidates still are
            missing[name] = f"download failed ({_reason(exc.__cause__ or exc)})"
    if missing:
        names = list(missing)
        reasons = sorted(set(missing.values()))
        from_hub = [s.name for s in loaded if s.name in wanted]
        rest = " and ".join(filter(None, ["the packaged models" if packaged else "", ", ".join(from_hub)])) or DEFAULT_MODEL
        line = (f"hub model{'s' if len(names) > 1 else ''} {', '.join(names)} skipped: {'; '.join(reasons)}; "
                f"going on with {rest}")
        if zoo == "hub" and not loaded:
            raise AutotlError(f"--models hub: no hub model could be had ({'; '.join(reasons)}); connect to the "
                              "internet (unset HF_HUB_OFFLINE), or use --models packaged")
        _console.log(line, markup=False, soft_wrap=True)
    if not loaded:  # nothing packaged is installed and the hub gave nothing: the default model's own error
        loaded.append(create_source_model(DEFAULT_MODEL))
    return loaded
