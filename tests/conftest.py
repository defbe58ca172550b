"""Shared fixtures: small generated class-per-folder image datasets (numpy + Pillow only)."""

from __future__ import annotations

import colorsys
import contextlib
import os

# Tests never reach a model hub: fail fast instead of retrying over a dead network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ... nor read this machine's Hugging Face cache: hub candidates in a test are the test's own (fake_hub_cache).
os.environ["HF_HUB_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"autotl-test-hf-{os.getpid()}")
os.environ.setdefault("AUTOTL_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"autotl-test-cache-{os.getpid()}"))
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest
from PIL import Image


def class_image(class_index: int, n_classes: int, size=(48, 40), rng=None) -> Image.Image:
    """One RGB image of class ``class_index``: a class colour + class stripe orientation + noise.

    Classes differ in mean colour (hue spaced around the wheel) and stripe orientation, so a tiny
    model separates them easily; every image gets a random stripe phase/frequency and pixel noise.
    """
    rng = np.random.default_rng(rng)
    w, h = size
    hue = class_index / max(1, n_classes)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.85)) * 255.0
    angle = np.pi * class_index / max(1, n_classes)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.25, 0.4)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img = img + rng.normal(0.0, 12.0, size=(h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_image_folder(
    root: str | Path,
    classes: Mapping[str, int | Sequence[int]] | None = None,
    size: tuple[int, int] = (48, 40),
    splits: Sequence[str] | None = None,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """Write ``root/<class>/<class>_<i><ext>`` (or ``root/<split>/<class>/...`` with ``splits``).

    ``classes`` maps class name -> number of images; with ``splits`` the number is per split, or a
    sequence giving one count per split (0 leaves that class folder out of that split).
    ``size`` is (width, height). Returns ``root``.
    """
    root = Path(root)
    classes = dict(classes if classes is not None else {"cat": 12, "dog": 12})
    names = list(classes)
    for ci, name in enumerate(names):
        counts = classes[name]
        per_split = list(counts) if isinstance(counts, Sequence) else [counts] * len(splits or [None])
        for si, split in enumerate(splits or [None]):
            n = per_split[si]
            if n <= 0:
                continue
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, ci, si, i])
                img = class_image(ci, len(names), size, rng)
                img.save(folder / f"{name}_{i:03d}{ext}")
    return root


def write_fake_hub_cache(cache: str | Path, names: Sequence[str], revision: str = "0" * 39 + "1") -> Path:
    """A Hugging Face hub cache folder as huggingface_hub lays it out, holding random-init weights
    (safetensors) of the timm models ``names`` (``arch.tag``): ``models--timm--NAME/snapshots/REV/
    model.safetensors`` and ``refs/main`` = REV. Returns ``cache``."""
    import timm
    import torch
    from safetensors.torch import save_file

    cache = Path(cache)
    for name in names:
        repo = cache / f"models--timm--{name}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = timm.create_model(name, pretrained=False)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(snapshot / "model.safetensors"))
    return cache


@pytest.fixture
def fake_hub_cache(tmp_path, monkeypatch):
    """Factory: ``fake_hub_cache(names)`` -> a hub cache holding random weights of ``names``, made
    this process's Hugging Face cache (``HF_HUB_CACHE``; huggingface_hub reads it at import)."""
    import huggingface_hub.constants

    def make(names: Sequence[str]) -> Path:
        cache = write_fake_hub_cache(tmp_path / "hf-hub", names)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        return cache

    return make


@pytest.fixture
def make_image_folder():
    """Factory: ``make_image_folder(tmp_path, classes={"cat": 12, "dog": 12}, size=(48, 40), splits=None)``."""
    return write_image_folder


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def cats_vs_dogs() -> Path:
    """../shared/data/cats_vs_dogs, or skip when this machine does not have it."""
    path = SHARED_DATA / "cats_vs_dogs"
    if not (path / "train").is_dir():
        pytest.skip(f"{path} is absent (real-photo data lives in ../shared/data)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own feature cache, so cache hits are the test's own doing."""
    monkeypatch.setenv("AUTOTL_CACHE_DIR", str(tmp_path / "feature-cache"))


@contextlib.contextmanager
def limited_torch_threads(n: int):
    """At most ``n`` torch threads inside, the previous count restored after. Tiny models on a busy
    2-core machine gain nothing from more threads and lose a lot to OpenMP spin-waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread(monkeypatch):
    """One torch thread, and ``fit`` is kept from resetting it."""
    import autotl.run

    monkeypatch.setattr(autotl.run, "set_torch_threads", lambda: None)
    with limited_torch_threads(1):
        yield


def tiny_training_setup(folder: Path):
    """(index, source, extractor) for training-loop tests: two classes of 8 generated 40 px images in
    ``folder``, a random-weight ``test_efficientnet`` and one uncached extractor."""
    from autotl.data import scan_dataset
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model

    index = scan_dataset(write_image_folder(folder, {"a": 8, "b": 8}, size=(40, 40)))
    source = create_source_model("test_efficientnet=random")
    return index, source, FeatureExtractor(source, cache_dir=None)
