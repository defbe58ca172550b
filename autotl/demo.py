"""``autotl demo``: a small generated image set, fitted end to end with the packaged EfficientNet-Lite0."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circles", "squares", "triangles")


def make_demo_dataset(root: str | Path, per_class: int = 24, size: int = 96, seed: int = 0) -> Path:
    """Photos of shapes on cluttered, noisy backgrounds (one folder per shape)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in DEMO_CLASSES:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(60, 200, size=3)
            pixels = np.clip(bg + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            draw = ImageDraw.Draw(img)
            r = int(rng.integers(size // 6, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if label == "circles":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif label == "squares":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            img.save(folder / f"{label}_{i:03d}.jpg", quality=92)
    return root


DEMO_BUDGET = "45s"


def demo(out: str | Path | None = None, *, time_budget: str | float | None = DEMO_BUDGET, search: bool = True,
         seed: int = 0):
    """Generate the demo data set in a temp folder and run ``fit`` on it: the packaged models are
    ranked, the strategy is searched for ``time_budget`` (cross-validated), the winner refitted and
    exported (offline, CPU-friendly, under 3 minutes on 2 cores). ``search=False``: one linear probe."""
    from .fit import fit

    with tempfile.TemporaryDirectory(prefix="autotl-demo-") as tmp:
        data = make_demo_dataset(Path(tmp) / "shapes", seed=seed)
        out = Path(out) if out else Path("runs") / "demo"
        if not search:
            return fit(data, out, seed=seed, epochs=20, search=False)
        return fit(data, out, seed=seed, time_budget=time_budget)
