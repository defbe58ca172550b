"""Large JPEGs decode at reduced scale (libjpeg's 1/2, 1/4, 1/8), never below what the resize needs,
upright per EXIF, and with features as close to the full decode as Pillow's own two-step resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from autotl._images import DRAFT_MARGIN, draft_side, load_rgb
from autotl.data import Sample
from autotl.features import ImageDataset, decode_min_side, eval_transform, train_transform
from autotl.predict import _prep, preprocess_batch


def pink_noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """An RGB image with a natural image's 1/f spectrum: detail at every scale, unlike plain noise."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    planes = []
    for _ in range(3):
        x = np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f, s=(h, w))
        planes.append((x - x.mean()) / x.std())
    return Image.fromarray(np.clip(128 + 40 * np.stack(planes, -1), 0, 255).astype(np.uint8))


CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "crop_pct": 0.875, "crop_mode": "center"}


@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (2000, 1500), (1100, 513), (1023, 1023), (600, 400), (300, 200)])
@pytest.mark.parametrize("min_side", [256, 512])
def test_draft_never_decodes_below_min_side_and_reduces_when_it_can(tmp_path, size, min_side):
    p = tmp_path / "big.jpg"
    Image.new("RGB", size, (90, 120, 150)).save(p, quality=90)
    out = load_rgb(p, min_side=min_side)
    short = min(size)
    assert min(out.size) >= min(min_side, short)  # never below what the resize needs (or the file has)
    # ... at a JPEG scale, and the smallest one: twice that would fall below min_side
    scale = next(k for k in (1, 2, 4, 8) if out.size == tuple(math.ceil(s / k) for s in size))
    assert scale == 8 or short // min_side < 2 * scale
    assert scale > 1 or short < 2 * min_side


def test_png_and_small_jpegs_decode_at_full_size(tmp_path):
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (1, 2, 3)).save(png)
    assert load_rgb(png, min_side=256).size == (2000, 1500)
    small = tmp_path / "small.jpg"
    Image.new("RGB", (500, 400), (1, 2, 3)).save(small)
    assert load_rgb(small, min_side=draft_side(256)).size == (500, 400)


@pytest.mark.parametrize("orientation, upright", [(6, (1200, 1600)), (8, (1200, 1600)), (3, (1600, 1200))])
def test_draft_keeps_exif_orientation(tmp_path, orientation, upright):
    """Draft happens on the stored pixels, before the EXIF transpose: the sizes swap with the rotation
    and the content is the full decode's, only smaller."""
    img = pink_noise(1600, 1200, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rot.jpg"
    img.save(p, quality=92, exif=exif)
    full = load_rgb(p)
    assert full.size == upright
    small = load_rgb(p, min_side=300)
    assert min(small.size) >= 300 and small.size == (upright[0] // 4, upright[1] // 4)
    want = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    got = np.asarray(small, dtype=np.float32)
    wrong = np.asarray(full.transpose(Image.Transpose.ROTATE_180).resize(small.size, Image.Resampling.BOX), np.float32)
    assert np.abs(got - want).mean() < 3.0 < np.abs(got - wrong).mean()


@pytest.mark.parametrize("crop_mode, input_size", [("center", (3, 224, 224)), ("squash", (3, 224, 224)),
                                                   ("border", (3, 224, 224)), ("center", (3, 240, 200))])
def test_training_and_predict_decode_by_the_same_rule(crop_mode, input_size):
    """The eval transform's resize target (input / crop_pct) times the margin, in the extractor's
    dataset and in torch-free predict alike: both see the same pixels."""
    cfg = {**CONFIG, "crop_mode": crop_mode, "input_size": input_size}
    side = decode_min_side(eval_transform(cfg))
    assert side == draft_side(max(math.floor(s / cfg["crop_pct"]) for s in input_size[1:])) == _prep(cfg).min_side
    assert side >= DRAFT_MARGIN * max(input_size[1:]) / cfg["crop_pct"] - 1


def test_training_decode_keeps_the_smallest_random_crop_large_enough():
    """A random resized crop can take 8 % of the image at aspect 3:4: an image of that shorter side
    still gives such a crop at least the margin times the output size."""
    tf = train_transform(CONFIG)
    side = decode_min_side(tf)
    crop = tf.transforms[0]
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    img = Image.new("RGB", (side, side))
    smallest = min(min(crop.get_params(img, (0.08, 0.0801), crop.ratio)[2:]) for _ in range(500))
    torch.random.set_rng_state(rng_state)
    assert smallest >= DRAFT_MARGIN * 224 - 2  # (get_params rounds)
    assert decode_min_side(lambda x: x) is None  # a transform that does not start with a resize: full decode


def _features(model, tensors: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model.forward_head(model.forward_features(torch.stack(tensors)), pre_logits=True).numpy()


def test_draft_features_are_as_close_to_the_full_decode_as_pillows_own_fast_resize(tmp_path):
    """Tolerance: the full decode reduced first by Pillow's ``reducing_gap=2`` rule (integer box
    reduce while the final resample still shrinks by >= 2; the default of ``Image.thumbnail``, which
    Pillow documents as close to fair resampling). A draft decode may not move the pooled features
    further from the full decode than that. A margin of 1 (decoding at 1/8 here) fails it (2.3x)."""
    from autotl.models import create_source_model

    source = create_source_model("test_efficientnet=random")
    model = source.model.eval()
    tf = eval_transform(source.data_config)
    side = math.floor(source.data_config["input_size"][1] / source.data_config["crop_pct"])
    p = tmp_path / "photo.jpg"
    pink_noise(2400, 1800).save(p, quality=90)
    sample = [Sample(p, 0)]
    drafted, full = ImageDataset(sample, tf)[0][0], ImageDataset(sample, tf, draft=False)[0][0]
    assert ImageDataset(sample, tf).min_side == draft_side(side)
    assert torch.equal(drafted, tf(load_rgb(p, min_side=draft_side(side))))  # the dataset decodes by the rule
    assert min(load_rgb(p, min_side=draft_side(side)).size) < 1800  # (and it did decode smaller)
    img = load_rgb(p)
    pillow = tf(img.reduce(max(1, int(min(img.size) / (2 * side)))))
    f_full, f_draft, f_pillow = _features(model, [full, drafted, pillow])
    rel = lambda f: float(np.linalg.norm(f - f_full) / np.linalg.norm(f_full))  # noqa: E731
    assert 0 < rel(f_draft) <= rel(f_pillow) < 0.05


def test_predict_decodes_large_jpegs_by_the_rule(tmp_path):
    """``autotl predict`` decodes with draft too, and its preprocessed batch is the same as timm's eval
    transform of the same draft-decoded image (training and serving see the same pixels)."""
    from autotl.predict import _decode

    p = tmp_path / "photo.jpg"
    pink_noise(2400, 1800, seed=3).save(p, quality=90)
    batch, ok, errors = _decode([p], _prep(CONFIG))
    assert ok == [p] and not errors
    want = eval_transform(CONFIG)(load_rgb(p, min_side=decode_min_side(eval_transform(CONFIG)))).numpy()
    assert np.allclose(batch[0], want, atol=1e-6)
    assert not np.allclose(batch[0], preprocess_batch([load_rgb(p)], CONFIG)[0], atol=1e-3)  # draft did change pixels


@pytest.mark.slow
def test_draft_on_real_photos_keeps_pretrained_predictions(tmp_path, cats_vs_dogs):
    """Cats vs Dogs photos tiled into one 12-megapixel JPEG (real detail at full resolution), through the
    pretrained Lite0: draft moves the features no more than Pillow's fast resize and keeps ImageNet top-1."""
    from autotl.models import create_source_model

    try:
        source = create_source_model("tf_efficientnet_lite0")
    except Exception as exc:  # noqa: BLE001 - the packaged weights are not installed here
        pytest.skip(f"pretrained Lite0 unavailable: {exc}")
    files = sorted((cats_vs_dogs / "val").rglob("*.jpg"))[:192]
    model, tf = source.model.eval(), eval_transform(source.data_config)
    side = math.floor(224 / 0.875)
    full_t, draft_t, pillow_t = [], [], []
    for k in range(3):
        mosaic = Image.new("RGB", (4000, 3000))
        for i in range(192):
            tile = Image.open(files[(i + 64 * k) % len(files)]).convert("RGB").resize((250, 250))
            mosaic.paste(tile, ((i % 16) * 250, (i // 16) * 250))
        p = tmp_path / f"mosaic{k}.jpg"
        mosaic.save(p, quality=90)
        img = load_rgb(p)
        full_t.append(tf(img))
        draft_t.append(ImageDataset([Sample(p, 0)], tf)[0][0])
        pillow_t.append(tf(img.reduce(max(1, int(min(img.size) / (2 * side))))))
    with torch.no_grad():
        logits = [model(torch.stack(t)) for t in (full_t, draft_t)]
    f_full, f_draft, f_pillow = (_features(model, t) for t in (full_t, draft_t, pillow_t))
    rel = lambda f: np.linalg.norm(f - f_full, axis=1) / np.linalg.norm(f_full, axis=1)  # noqa: E731
    assert (rel(f_draft) <= rel(f_pillow) * 1.05).all(), (rel(f_draft), rel(f_pillow))
    assert torch.equal(logits[0].argmax(1), logits[1].argmax(1))
