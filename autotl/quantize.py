"""int8 export: onnxruntime static quantisation (QDQ) of ``model.onnx``, calibrated on training images,
kept only when it holds its accuracy on the validation images.

``write_int8`` preprocesses a stratified sample of training images exactly as ``autotl predict``
does (``autotl.predict.preprocess_batch``), lets onnxruntime's calibrator collect activation ranges
on them (``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations), and then
runs both files over the validation images: the int8 model is written as ``model.int8.onnx``
only when its accuracy is at most ``MAX_DROP_POINTS`` below the fp32 model's. Otherwise it is
refused with a one-line reason and the fp32 model stays the only one. Either way the report
(both files' size, latency per image and validation accuracy) goes on the card.

Torch-free (onnxruntime + numpy + Pillow), like the predict path it serves.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from autotl._console import log
from autotl._images import load_rgb

__all__ = ["INT8_NAME", "MAX_DROP_POINTS", "CALIBRATION_IMAGES", "Int8Report", "quantize_static_int8", "write_int8", "quantize_run",
           "latency_ms"]

INT8_NAME = "model.int8.onnx"
MAX_DROP_POINTS = 0.5  # the gate: int8 may lose at most this many accuracy points on val
CALIBRATION_IMAGES = 256
# onnxruntime's arena keeps the largest batch's activations (over 1 GB for 32 images at 260 px per
# session): validation goes 8 images at a time; the calibrator's session (every tensor an output
# of its graph) takes 1.6 GB for 8 images of 260 px and 0.2 GB for one, so it gets one at a time
_BATCH = 8
_CALIBRATION_BATCH = 1


@dataclass
class Int8Report:
    """Both models side by side, and whether the int8 one was kept."""

    kept: bool
    reason: str
    fp32: dict = field(default_factory=dict)  # {"file", "size_bytes", "latency_ms_per_image", "val_accuracy"}
    int8: dict = field(default_factory=dict)
    drop_points: float | None = None
    max_drop_points: float = MAX_DROP_POINTS
    n_calibration: int = 0
    n_val: int = 0
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


def _batches(paths: Sequence[Path], preprocessing: dict, batch: int = _BATCH) -> Iterator[np.ndarray]:
    from autotl.predict import _prep, preprocess_batch

    side = _prep(preprocessing).min_side  # decoded as predict decodes them
    for start in range(0, len(paths), batch):
        yield preprocess_batch([load_rgb(p, min_side=side) for p in paths[start:start + batch]], preprocessing)


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


def write_int8(run_dir: str | os.PathLike, preprocessing: dict, train: Sequence, val: Sequence, *, seed: int = 0,
               calibration_images: int = CALIBRATION_IMAGES, max_drop_points: float = MAX_DROP_POINTS) -> Int8Report:
    """Quantise ``run_dir/model.onnx`` into ``run_dir/model.int8.onnx`` and gate it on ``val``
    (``train``/``val``: samples with ``.path`` and ``.label``). A refused model is not written;
    a stale ``model.int8.onnx`` of an earlier model is removed first either way."""
    from autotl._io import atomic_path
    from autotl.card import file_sha256

    run_dir = Path(run_dir)
    fp32_path, int8_path = run_dir / "model.onnx", run_dir / INT8_NAME
    int8_path.unlink(missing_ok=True)
    report = Int8Report(kept=False, reason="")
    if not val or not train:
        report.reason = "int8 refused: it needs training images to calibrate on and validation images to check it against"
        log(f"[yellow]{report.reason}; keeping model.onnx (fp32)")
        return report
    calib_paths = _stratified([s.path for s in train], [s.label for s in train], calibration_images, seed)
    val_paths, val_labels = [s.path for s in val], np.asarray([s.label for s in val])
    report.n_calibration, report.n_val = len(calib_paths), len(val)
    try:
        with atomic_path(int8_path) as tmp:
            quantize_static_int8(fp32_path, tmp, _batches(calib_paths, preprocessing, _CALIBRATION_BATCH))
            sessions = {"fp32": _session(fp32_path), "int8": _session(tmp)}
            # one pass over val, both models on each decoded batch (val is never all in memory)
            predicted: dict[str, list[np.ndarray]] = {kind: [] for kind in sessions}
            latency: dict[str, float] = {}
            for x in _batches(val_paths, preprocessing):
                for kind, session in sessions.items():
                    if kind not in latency:
                        latency[kind] = latency_ms(session, x)
                    predicted[kind].append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1))
            for kind, path in (("fp32", fp32_path), ("int8", tmp)):
                setattr(report, kind, {"file": fp32_path.name if kind == "fp32" else INT8_NAME,
                                       "size_bytes": Path(path).stat().st_size,
                                       "latency_ms_per_image": round(latency[kind], 3),
                                       "val_accuracy": float(np.mean(np.concatenate(predicted[kind]) == val_labels))})
            drop = 100.0 * (report.fp32["val_accuracy"] - report.int8["val_accuracy"])
            report.drop_points = round(drop, 3)
            if drop > max_drop_points:
                raise _Refused(f"int8 refused: it loses {drop:.2f} accuracy points on {len(val)} validation images "
                               f"(> {max_drop_points:g} allowed); keeping model.onnx (fp32)")
            report.sha256 = file_sha256(tmp)
    except _Refused as refused:
        report.reason = str(refused)
        log(f"[yellow]{report.reason}")
        return report
    share = report.int8["size_bytes"] / report.fp32["size_bytes"]
    report.kept = True
    report.reason = (f"int8 kept: {share:.0%} of the fp32 size, {report.drop_points:+.2f} points on {len(val)} "
                     f"validation images (at most {max_drop_points:g} allowed)")
    log(f"[green]{report.reason}[/] → {int8_path}")
    return report


class _Refused(Exception):
    """Leaves ``atomic_path`` without renaming the refused model into place."""


def quantize_run(run_dir: str | os.PathLike, *, quantize: str = "int8", data_dir: str | os.PathLike | None = None,
                 val_fraction: float = 0.1) -> Int8Report:
    """``autotl export RUN --quantize int8``: the int8 model of a finished run, calibrated on its
    training images and gated on its validation images (the data re-scanned and checked to be the
    fit's), its report written onto the card."""
    import json

    from autotl.card import CARD_NAME, ModelCard, check_model_matches
    from autotl.data import scan_dataset
    from autotl.errors import AutotlError
    from autotl.options import check_fraction, check_quantize

    check_quantize(quantize, optional=False)
    check_fraction("--val-fraction", val_fraction, "validation share")
    run_dir = Path(run_dir)
    model, card_file = run_dir / "model.onnx", run_dir / CARD_NAME
    if not model.is_file():
        raise AutotlError(f"{run_dir}: no model.onnx there; give a finished run folder (the --out of `autotl fit`)")
    card = ModelCard.load(card_file)
    check_model_matches(card, model, card_file)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        recorded = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AutotlError(f"{run_dir}: config.json / data.json unreadable ({exc}); run `autotl fit ... --quantize int8` "
                          "again instead") from None
    root = Path(data_dir) if data_dir is not None else Path(config.get("data_dir", ""))
    if not root.is_dir():
        raise AutotlError(f"--data {root}: the run's data folder is not there; pass --data with its current location")
    seed = int((config.get("train_config") or {}).get("seed", 0))
    index = scan_dataset(root, val_fraction=val_fraction, seed=seed)
    if recorded.get("fingerprint") and index.fingerprint() != recorded["fingerprint"]:
        raise AutotlError(f"--data {root}: these are not the images the run was fitted on (files changed since, or the fit "
                          "used another --val-fraction / --duplicates); calibrate on the fit's data or refit with --quantize int8")
    report = write_int8(run_dir, card.preprocessing, index.train, index.val, seed=seed)
    card.extra["int8"] = report.to_json()
    card.save(card_file)
    return report
