"""int8 export: onnxruntime static quantisation (QDQ) of ``model.onnx``, calibrated on training images,
kept only when it holds its accuracy on images the shipped model did not train on.

``write_int8`` preprocesses a stratified sample of training images exactly as ``autotl predict``
does (``autotl.predict.preprocess_batch``), lets onnxruntime's calibrator collect activation ranges
on them (``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations), and then
runs both files over the *gate* images: the int8 model is written as ``model.int8.onnx`` only when
its accuracy there is at most ``MAX_DROP_POINTS`` below the fp32 model's. Otherwise it is refused
with a one-line reason and the fp32 model stays the only one. Either way the report (both files'
size, latency per image, accuracy and agreement on the gate images, and which images those were:
``gate``) goes on the card.

Which images gate (``choose_gate``): a model that decides on images it trained on would pass an
int8 twin that only keeps its memorised answers, so

1. ``val``: when the shipped model did not train on val (``--no-search``: val only chose the
   early-stopping epoch) — val is held out from training and the test split stays untouched;
2. ``test``: after a search the refit trains on train + val, so a ``test/`` split, which no step
   trained or decided on, gates instead;
3. ``views``: a searched model without a test split has no labelled image it did not train on.
   Then the gate runs on ``GATE_VIEWS`` augmented views of the labelled images — random resized
   crops (25–100 % of the area, aspect 3/4–4/3), horizontal flips and brightness / contrast /
   saturation jitter (±40 %), the distortions of timm's train transform: inputs the model never saw,
   away from the training points where its margins are widest, so int8 flips show up as they
   would on new photos; the crops keep enough of the picture for its label to hold. The gate is
   the accuracy drop on those views (the same measure and threshold as on a split); the
   agreement of the two models' top-1 is reported beside it. The views are made with Pillow (the
   transforms of torchvision / timm need torch, and this module is torch-free), seeded, so a run
   gates the same way every time.

Torch-free (onnxruntime + numpy + Pillow), like the predict path it serves.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from autotl._console import log
from autotl._images import load_rgb

__all__ = ["INT8_NAME", "MAX_DROP_POINTS", "CALIBRATION_IMAGES", "GATE_VIEWS", "Int8Report", "Gate", "choose_gate",
           "augmented_view", "quantize_static_int8", "write_int8", "quantize_run", "latency_ms"]

INT8_NAME = "model.int8.onnx"
MAX_DROP_POINTS = 0.5  # the gate: int8 may lose at most this many accuracy points on the gate images
CALIBRATION_IMAGES = 256
GATE_VIEWS = 512  # augmented views when no labelled image is held out (one flip = 0.2 points)
_VIEW_SCALE = (0.25, 1.0)  # share of the image area a view crops
_VIEW_RATIO = (3 / 4, 4 / 3)
_VIEW_JITTER = 0.4  # brightness, contrast and saturation factors in [1 - j, 1 + j]
# onnxruntime's arena keeps the largest batch's activations (over 1 GB for 32 images at 260 px per
# session): validation goes 8 images at a time; the calibrator's session (every tensor an output
# of its graph) takes 1.6 GB for 8 images of 260 px and 0.2 GB for one, so it gets one at a time
_BATCH = 8
_CALIBRATION_BATCH = 1


@dataclass
class Gate:
    """The images that decide whether int8 is kept, in the card's words (``Int8Report.gate``)."""

    images: str  # "val" | "test" | "views"
    samples: Sequence  # the labelled samples (views: the images the views are cut from)
    text: str  # what they are, and why the model did not train on them
    n: int = 0  # images (views) the two models are compared on

    def to_json(self) -> dict:
        return {"images": self.images, "n": self.n, "trained_on": False, "text": self.text}


def choose_gate(val: Sequence, test: Sequence, labelled: Sequence, *, trained_on_val: bool,
                views: int = GATE_VIEWS) -> Gate:
    """The gate images of a model (module docstring): val when it did not train on val, else the
    test split, else augmented views of the ``labelled`` images."""
    if val and not trained_on_val:
        return Gate("val", list(val), "the val split: held out from training (it chose the early-stopping epoch only)",
                    len(val))
    if test:
        return Gate("test", list(test), "the test/ split: the model never trained on it and it decided nothing else",
                    len(test))
    return Gate("views", list(labelled), f"{views} augmented views (random resized crops, flips, colour jitter) of the "
                "labelled images: the model trained on every labelled image, so no held-out one is left; the views "
                "are inputs it never saw", views if labelled else 0)


@dataclass
class Int8Report:
    """Both models side by side on the gate images, and whether the int8 one was kept."""

    kept: bool
    reason: str
    # {"file", "size_bytes", "latency_ms_per_image", "<gate images>_accuracy"} (+ "agreement_with_fp32" for int8)
    fp32: dict = field(default_factory=dict)
    int8: dict = field(default_factory=dict)
    drop_points: float | None = None
    max_drop_points: float = MAX_DROP_POINTS
    n_calibration: int = 0
    gate: dict = field(default_factory=dict)  # Gate.to_json(): which images decided, and how many
    sha256: str = ""  # of model.int8.onnx when kept: predict checks it like model.onnx

    def to_json(self) -> dict:
        return asdict(self)


def _session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batches(paths: Sequence[Path], preprocessing: dict, batch: int = _BATCH,
             view: Callable[[Image.Image, int], Image.Image] | None = None) -> Iterator[np.ndarray]:
    """Preprocessed batches of ``paths``; ``view(image, i)`` first changes the i-th image (augmented views)."""
    from autotl.predict import _prep, preprocess_batch

    side = _prep(preprocessing).min_side  # decoded as predict decodes them
    for start in range(0, len(paths), batch):
        images = [load_rgb(p, min_side=side) for p in paths[start:start + batch]]
        if view is not None:
            images = [view(img, start + i) for i, img in enumerate(images)]
        yield preprocess_batch(images, preprocessing)


def augmented_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random view of ``img``: a resized-crop box (as torchvision's ``RandomResizedCrop`` draws it:
    area share and log-uniform aspect, ten tries, else the whole image), a horizontal flip half the
    time, then brightness, contrast and saturation jitter."""
    w, h = img.size
    box = (0, 0, w, h)
    for _ in range(10):
        area = w * h * rng.uniform(*_VIEW_SCALE)
        ratio = math.exp(rng.uniform(math.log(_VIEW_RATIO[0]), math.log(_VIEW_RATIO[1])))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            break
    out = img.crop(box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(float(rng.uniform(1 - _VIEW_JITTER, 1 + _VIEW_JITTER)))
    return out


def _gate_inputs(gate: Gate, seed: int) -> tuple[list[Path], np.ndarray, Callable | None]:
    """(paths, labels, view) the two models are compared on: the gate's images, or for ``views``
    ``gate.n`` views cycling over a shuffled list of the labelled images (seeded)."""
    paths, labels = [s.path for s in gate.samples], np.asarray([s.label for s in gate.samples])
    if gate.images != "views" or not paths:
        return paths, labels, None
    order = np.random.default_rng([seed, 0x71E]).permutation(len(paths))
    pick = [int(order[i % len(order)]) for i in range(gate.n)]

    def view(img: Image.Image, i: int) -> Image.Image:
        return augmented_view(img, np.random.default_rng([seed, 0x71E, i]))

    return [paths[i] for i in pick], labels[pick], view


def quantize_static_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: Iterable[np.ndarray]) -> Path:
    """QDQ int8 model of ``fp32_path`` at ``out_path``: per-channel int8 weights, uint8 activations,
    ranges from ``calibration`` (preprocessed float32 batches, read once, lazily) by min/max."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = _session(fp32_path).get_inputs()[0].name
    batches = iter(calibration)

    class Reader(CalibrationDataReader):
        """The calibration images, one batch per call."""

        def get_next(self):
            x = next(batches, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory(prefix="autotl-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # symbolic shape inference + graph optimisation first, as onnxruntime's quantisation guide asks
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(str(prepared), str(out_path), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return Path(out_path)


def latency_ms(session, batch: np.ndarray, repeats: int = 3) -> float:
    """Median milliseconds per image of ``session`` on ``batch`` (after one warm-up run; the card's
    figure is for a batch of 8 validation images)."""
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0 / len(batch))


def _stratified(paths: Sequence[Path], labels: Sequence[int], n: int, seed: int) -> list[Path]:
    """At most ``n`` of ``paths``, every class in proportion (the calibration must see every class)."""
    if len(paths) <= n:
        return list(paths)
    rng = np.random.default_rng([seed, 0x18])
    labels = np.asarray(labels)
    picked: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(n * len(idx) / len(labels)))
        picked += rng.choice(idx, size=min(k, len(idx)), replace=False).tolist()
    return [paths[i] for i in sorted(picked)]


def write_int8(run_dir: str | os.PathLike, preprocessing: dict, train: Sequence, gate: Gate, *, seed: int = 0,
               calibration_images: int = CALIBRATION_IMAGES, max_drop_points: float = MAX_DROP_POINTS) -> Int8Report:
    """Quantise ``run_dir/model.onnx`` into ``run_dir/model.int8.onnx`` and gate it on ``gate``
    (``choose_gate``; ``train``: samples with ``.path`` and ``.label`` to calibrate on). A refused
    model is not written; a stale ``model.int8.onnx`` of an earlier model is removed first either way."""
    from autotl._io import atomic_path
    from autotl.card import file_sha256

    run_dir = Path(run_dir)
    fp32_path, int8_path = run_dir / "model.onnx", run_dir / INT8_NAME
    int8_path.unlink(missing_ok=True)
    report = Int8Report(kept=False, reason="", gate=gate.to_json())
    if not gate.samples or not train:
        report.reason = "int8 refused: it needs training images to calibrate on and images to check it against"
        log(f"[yellow]{report.reason}; keeping model.onnx (fp32)")
        return report
    calib_paths = _stratified([s.path for s in train], [s.label for s in train], calibration_images, seed)
    gate_paths, gate_labels, view = _gate_inputs(gate, seed)
    report.n_calibration = len(calib_paths)
    where = {"val": "validation images", "test": "test images", "views": "augmented views of the labelled images"}[gate.images]
    key = f"{gate.images}_accuracy"
    try:
        with atomic_path(int8_path) as tmp:
            quantize_static_int8(fp32_path, tmp, _batches(calib_paths, preprocessing, _CALIBRATION_BATCH))
            sessions = {"fp32": _session(fp32_path), "int8": _session(tmp)}
            # one pass over the gate images, both models on each decoded batch (never all in memory)
            predicted: dict[str, list[np.ndarray]] = {kind: [] for kind in sessions}
            latency: dict[str, float] = {}
            for x in _batches(gate_paths, preprocessing, view=view):
                for kind, session in sessions.items():
                    if kind not in latency:
                        latency[kind] = latency_ms(session, x)
                    predicted[kind].append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1))
            top1 = {kind: np.concatenate(p) for kind, p in predicted.items()}
            for kind, path in (("fp32", fp32_path), ("int8", tmp)):
                setattr(report, kind, {"file": fp32_path.name if kind == "fp32" else INT8_NAME,
                                       "size_bytes": Path(path).stat().st_size,
                                       "latency_ms_per_image": round(latency[kind], 3),
                                       key: float(np.mean(top1[kind] == gate_labels))})
            report.int8["agreement_with_fp32"] = float(np.mean(top1["int8"] == top1["fp32"]))
            drop = 100.0 * (report.fp32[key] - report.int8[key])
            report.drop_points = round(drop, 3)
            if drop > max_drop_points:
                raise _Refused(f"int8 refused: it loses {drop:.2f} accuracy points on {len(gate_paths)} {where} "
                               f"(> {max_drop_points:g} allowed); keeping model.onnx (fp32)")
            report.sha256 = file_sha256(tmp)
    except _Refused as refused:
        report.reason = str(refused)
        log(f"[yellow]{report.reason}")
        return report
    share = report.int8["size_bytes"] / report.fp32["size_bytes"]
    report.kept = True
    report.reason = (f"int8 kept: {share:.0%} of the fp32 size, {report.drop_points:+.2f} points on {len(gate_paths)} "
                     f"{where} (at most {max_drop_points:g} allowed)")
    log(f"[green]{report.reason}[/] → {int8_path}")
    return report


class _Refused(Exception):
    """Leaves ``atomic_path`` without renaming the refused model into place."""


def quantize_run(run_dir: str | os.PathLike, *, quantize: str = "int8", data_dir: str | os.PathLike | None = None,
                 val_fraction: float = 0.1) -> Int8Report:
    """``autotl export RUN --quantize int8``: the int8 model of a finished run, calibrated on its
    training images and gated on images the model did not train on (``choose_gate``; a searched
    run's refit trained on val), the data re-scanned and checked to be the fit's; its report
    written onto the card."""
    from autotl._runfolder import hold_run_folder
    from autotl.card import CARD_NAME
    from autotl.errors import AutotlError
    from autotl.options import check_fraction, check_out_dir, check_quantize

    check_quantize(quantize, optional=False)
    check_fraction("--val-fraction", val_fraction, "validation share")
    run_dir = Path(run_dir)
    model, card_file = run_dir / "model.onnx", run_dir / CARD_NAME
    if not model.is_file():
        raise AutotlError(f"{run_dir}: no model.onnx there; give a finished run folder (the --out of `autotl fit`)")
    check_out_dir("RUN", run_dir)  # it gets model.int8.onnx and an updated card: writable, before any work
    with hold_run_folder(run_dir, flag="RUN", command="export"):
        return _quantize_run(run_dir, model, card_file, data_dir, val_fraction)


def _quantize_run(run_dir: Path, model: Path, card_file: Path, data_dir, val_fraction: float) -> Int8Report:
    import json

    from autotl._labels import is_label_file
    from autotl.card import ModelCard, check_model_matches
    from autotl.data import scan_dataset
    from autotl.errors import AutotlError

    card = ModelCard.load(card_file)
    check_model_matches(card, model, card_file)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        recorded = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AutotlError(f"{run_dir}: config.json / data.json unreadable ({exc}); run `autotl fit ... --quantize int8` "
                          "again instead") from None
    root = Path(data_dir) if data_dir is not None else Path(config.get("data_dir", ""))
    if not (root.is_dir() or (is_label_file(root) and root.is_file())):
        raise AutotlError(f"--data {root}: the run's data folder (or label file) is not there; pass --data with its "
                          "current location")
    seed = int((config.get("train_config") or {}).get("seed", 0))
    # a label file is read with the columns the fit used (named by flags or detected)
    columns = ((recorded.get("label_file") or {}).get("columns") or {}) if root.is_file() else {}
    index = scan_dataset(root, val_fraction=val_fraction, seed=seed, path_column=columns.get("path"),
                         label_column=columns.get("label"))
    if recorded.get("fingerprint") and index.fingerprint() != recorded["fingerprint"]:
        raise AutotlError(f"--data {root}: these are not the images the run was fitted on (files changed since, or the fit "
                          "used another --val-fraction / --duplicates); calibrate on the fit's data or refit with --quantize int8")
    gate = choose_gate(index.val, index.test, index.train + index.val, trained_on_val=bool(card.extra.get("search")))
    report = write_int8(run_dir, card.preprocessing, index.train, gate, seed=seed)
    card.extra["int8"] = report.to_json()
    card.save(card_file)
    return report
