"""Torch-free inference: onnxruntime + numpy + Pillow, driven by ``model.json``.

This module (and everything it imports) must never import torch: a deployed model needs only
``onnxruntime``, ``numpy`` and ``pillow``. ``preprocess`` reproduces timm's eval transform
(``timm.data.create_transform(**data_config, is_training=False)``) to float32 rounding.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from autotl._console import progress
from autotl._csv import safe_row
from autotl._images import IMAGE_EXTENSIONS, UnreadableImageError, draft_side, is_image_path, load_rgb
from autotl._io import atomic_path, atomic_write_text
from autotl._labels import is_label_file, read_label_file
from autotl.card import ModelCard, card_path_for, check_model_matches
from autotl.errors import AutotlError

__all__ = ["preprocess", "preprocess_batch", "softmax", "expand_image_paths", "Predictor", "PredictionResult", "predict"]

_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class _Prep:
    size: tuple[int, int]  # (H, W)
    scale: tuple[int, int]  # (H, W) before cropping
    resample: Any
    crop_mode: str
    mean: np.ndarray  # float32 [C]
    std: np.ndarray
    fill: tuple[int, ...]  # padding colour for crop_mode "border"
    # decode large JPEGs at reduced scale, still at least this on the shorter side (what training's
    # ImageDataset does for the same transform: the same pixels reach the model)
    min_side: int | None = None


def _prep(preprocessing: dict) -> _Prep:
    _, h, w = (int(v) for v in preprocessing["input_size"])
    crop_pct = preprocessing.get("crop_pct") or _DEFAULT_CROP_PCT
    interpolation = preprocessing.get("interpolation", "bilinear")
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"unsupported interpolation {interpolation!r} (one of {', '.join(_PIL_RESAMPLE)})")
    crop_mode = preprocessing.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash", "border"):
        raise ValueError(f"unsupported crop_mode {crop_mode!r} (center, squash or border)")
    mean = [float(v) for v in preprocessing["mean"]]
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))  # timm: math.floor(x / crop_pct)
    return _Prep(
        size=(h, w),
        scale=scale,
        resample=_PIL_RESAMPLE[interpolation],
        crop_mode=crop_mode,
        mean=np.asarray(mean, dtype=np.float32),  # torch.tensor(mean) is float32 too
        std=np.asarray([float(v) for v in preprocessing["std"]], dtype=np.float32),
        fill=tuple(round(255 * v) for v in mean),
        min_side=draft_side(max(scale)),
    )


def _resize(img: Image.Image, size_hw: tuple[int, int], resample) -> Image.Image:
    # torchvision F.resize on PIL: no-op at the same size, else img.resize((w, h), resample)
    if (img.height, img.width) == tuple(size_hw):
        return img
    return img.resize((size_hw[1], size_hw[0]), resample)


def _resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    # torchvision transforms.Resize(int): shorter edge -> size, longer edge -> int(size * long / short)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return _resize(img, (new_h, new_w), resample)


def _resize_keep_ratio(img: Image.Image, target_hw: tuple[int, int], longest: float, resample) -> Image.Image:
    # timm ResizeKeepRatio (no random scale / aspect)
    img_h, img_w = img.height, img.width
    ratio_h, ratio_w = img_h / target_hw[0], img_w / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    size = [round(x * 1.0 / ratio) for x in (img_h, img_w)]
    return _resize(img, (size[0], size[1]), resample)


def _center_crop(img: Image.Image, size_hw: tuple[int, int], fill) -> Image.Image:
    # torchvision F.center_crop / timm center_crop_or_pad: pad (if smaller), then crop at round(offset)
    crop_h, crop_w = size_hw
    img_w, img_h = img.size
    if crop_w > img_w or crop_h > img_h:
        border = (
            (crop_w - img_w) // 2 if crop_w > img_w else 0,
            (crop_h - img_h) // 2 if crop_h > img_h else 0,
            (crop_w - img_w + 1) // 2 if crop_w > img_w else 0,
            (crop_h - img_h + 1) // 2 if crop_h > img_h else 0,
        )
        img = ImageOps.expand(img, border=border, fill=fill)
        img_w, img_h = img.size
        if (crop_w, crop_h) == (img_w, img_h):
            return img
    top = int(round((img_h - crop_h) / 2.0))
    left = int(round((img_w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def _geometry(img: Image.Image, p: _Prep) -> Image.Image:
    if img.mode != "RGB":
        img = img.convert("RGB")
    if p.crop_mode == "squash":
        img = _resize(img, p.scale, p.resample)
        return _center_crop(img, p.size, 0)
    if p.crop_mode == "border":
        img = _resize_keep_ratio(img, p.scale, 1.0, p.resample)
        return _center_crop(img, p.size, p.fill)
    if p.scale[0] == p.scale[1]:
        img = _resize_shorter(img, p.scale[0], p.resample)
    else:
        img = _resize_keep_ratio(img, p.scale, 0.0, p.resample)
    return _center_crop(img, p.size, 0)


def _normalise(pixels: np.ndarray, p: _Prep) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]``: /255 then (x - mean) / std, like ToTensor + Normalize.

    The same float32 operations in the same order as timm's (so the same bits), done per channel
    plane in place: broadcasting over a last axis of 3 costs ten times more."""
    planes = np.ascontiguousarray(np.moveaxis(pixels, -1, -3))  # still uint8: the cheap copy
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(planes.shape[-3]):
        o = out[..., c, :, :]
        np.divide(planes[..., c, :, :], np.float32(255.0), out=o, dtype=np.float32)
        np.subtract(o, p.mean[c], out=o)
        np.divide(o, p.std[c], out=o)
    return out


def preprocess(img: Image.Image, preprocessing: dict) -> np.ndarray:
    """One PIL image -> float32 ``(3, H, W)`` exactly as timm's eval transform for ``preprocessing``.

    ``preprocessing`` has timm's data-config keys: input_size [C, H, W], interpolation, mean, std,
    crop_pct, crop_mode ("center", "squash" or "border").
    """
    p = _prep(preprocessing)
    return _normalise(np.asarray(_geometry(img, p)), p)


def preprocess_batch(images: Sequence[Image.Image], preprocessing: dict) -> np.ndarray:
    """Several PIL images -> float32 ``(N, 3, H, W)``; normalisation is done once for the batch."""
    p = _prep(preprocessing)
    h, w = p.size
    if not images:
        return np.zeros((0, 3, h, w), dtype=np.float32)
    pixels = np.stack([np.asarray(_geometry(img, p)) for img in images])
    return _normalise(pixels, p)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (subtracts the max; computed in float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------- paths


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def expand_image_paths(paths: str | os.PathLike | Iterable[str | os.PathLike],
                       skipped: list[dict] | None = None, *, path_column: str | None = None) -> list[Path]:
    """Files as given (any extension), folders expanded recursively to their image files, and label
    files (``.csv``, ``.tsv``) to the images of their path column (``path_column``, else the column
    the header names ``path``, ``file``, ``image``...; relative to the file's folder; other columns,
    labels included, are not read).

    Hidden files and folders (``.name``) inside a folder are skipped; each folder's files are
    sorted; a label file's images keep their row order; duplicates are dropped. Files in a folder in
    an image format autotl does not read (``.gif``, ``.heic``, ...:
    ``autotl.data.UNSUPPORTED_IMAGE_EXTENSIONS``) are not classified: with ``skipped`` they are
    appended there as ``{"path", "reason"}``. A path that does not exist (a row's file included,
    named by its line), or nothing found at all, is an ``AutotlError``.
    """
    from autotl.data import UNSUPPORTED_IMAGE_EXTENSIONS

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise AutotlError("no image paths given; pass image files or folders of images")
    out: list[Path] = []
    unsupported: list[dict] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found, other = [], []
            for f in path.rglob("*"):
                if _is_hidden(f.relative_to(path)) or not f.is_file():
                    continue
                if is_image_path(f):
                    found.append(f)
                elif f.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
                    other.append(f)
            found.sort(key=lambda f: f.as_posix())
            for f in sorted(other, key=lambda f: f.as_posix()):
                if f not in seen:
                    seen.add(f)
                    fix = UNSUPPORTED_IMAGE_EXTENSIONS[f.suffix.lower()]
                    unsupported.append({"path": str(f), "reason": f"unsupported format {f.suffix.lower()}: {fix}"})
        elif is_label_file(path) and path.is_file():
            found = [row.path for row in read_label_file(path, path_column=path_column, labels=False).rows]
        elif path.exists() or path.is_symlink():
            found = [path]  # an explicit file: try it, an unreadable one is reported per image
        else:
            raise AutotlError(f"{path} does not exist; check the path (pass image files or folders of images)")
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    if not out and not unsupported:
        where = ", ".join(str(p) for p in paths)
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise AutotlError(f"no images found in {where}; expected files with extensions {exts}")
    if skipped is not None:
        skipped.extend(unsupported)
    return out


# --------------------------------------------------------------------------- results


@dataclass
class PredictionResult:
    """Per-image top-k predictions plus the images that could not be read."""

    predictions: list[dict] = field(default_factory=list)  # {"path", "top": [{"label", "prob"}, ...]}
    errors: list[dict] = field(default_factory=list)  # {"path", "reason"}
    classes: list[str] = field(default_factory=list)
    model: str = ""
    top_k: int = 5
    n_total: int | None = None  # images predicted, when ``predictions`` keeps only the first ones

    def __len__(self) -> int:
        return len(self.predictions)

    @property
    def n_images(self) -> int:
        return len(self.predictions) if self.n_total is None else self.n_total

    @property
    def labels(self) -> list[str]:
        """Top-1 label per predicted image (same order as ``predictions``)."""
        return [p["top"][0]["label"] for p in self.predictions]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "classes": list(self.classes),
            "top_k": self.top_k,
            "n_images": self.n_images,
            "n_errors": len(self.errors),
            "predictions": self.predictions,
            "errors": self.errors,
        }

    def csv_text(self) -> str:
        k = max([len(p["top"]) for p in self.predictions] + [0])
        header = ["path", "label", "prob", *[f"top{i}_{w}" for i in range(1, k + 1) for w in ("label", "prob")], "error"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(_csv_rows(self.predictions, len(header)))
        writer.writerows(_error_rows(self.errors, len(header)))
        return buf.getvalue()

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Columns: path, label, prob, top1_label, top1_prob, ..., error (rows for unreadable images too)."""
        from autotl.options import check_out_file

        check_out_file("--csv", path, "predictions.csv")
        return atomic_write_text(path, self.csv_text())

    def table(self, max_rows: int | None = None):
        """A rich Table: path, label, prob, the other top-k, and unreadable images with their reason."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"predictions ({self.n_images} images, {len(self.errors)} unreadable)")
        table.add_column("path", overflow="fold")
        table.add_column("label", style="bold")
        table.add_column("prob", justify="right")
        table.add_column("next", style="dim")
        rows = self.predictions if max_rows is None else self.predictions[:max_rows]
        for p in rows:
            top = p["top"]
            rest = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in top[1:])
            table.add_row(escape(p["path"]), escape(top[0]["label"]), f"{top[0]['prob']:.3f}", escape(rest))
        if self.n_images > len(rows):
            table.add_row(f"... {self.n_images - len(rows)} more", "", "", "")
        for e in self.errors:
            table.add_row(escape(e["path"]), "[red]unreadable", "", f"[red]{escape(e['reason'])}")
        return table


def _fmt_prob(p: float) -> str:
    return f"{p:.6g}"


# --------------------------------------------------------------------------- predictor


class Predictor:
    """An exported model (``model.onnx`` + its card) ready to classify images, without torch.

    ``onnx_path`` may also be the folder holding ``model.onnx``.
    """

    def __init__(self, onnx_path: str | os.PathLike, *, card_path: str | os.PathLike | None = None,
                 num_threads: int | None = None):
        import onnxruntime as ort

        path = Path(onnx_path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise AutotlError(f"model file {path} not found; pass the model.onnx written by autotl (or its folder)")
        self.onnx_path = path
        card_file = card_path if card_path is not None else card_path_for(path)
        self.card = ModelCard.load(card_file)
        check_model_matches(self.card, path, card_file)
        self._prep = _prep(self.card.preprocessing)  # validated by the card already

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            msg = " ".join(str(exc).split())[:200]
            raise AutotlError(f"model file {path} is not a loadable ONNX model ({msg}); use the model.onnx written by `autotl fit` (or fit again)") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self._check_shapes(inp.shape, self.session.get_outputs()[0].shape)

    def _check_shapes(self, in_shape, out_shape) -> None:
        want = list(self.card.preprocessing["input_size"])
        got = list(in_shape[1:]) if len(in_shape) == 4 else None
        if got is None or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise AutotlError(
                f"model file {self.onnx_path} takes input {list(in_shape)} but its card {card_path_for(self.onnx_path)} "
                f"says input_size {want}; the card belongs to another model: use the model.json written with it"
            )
        n_out = out_shape[-1] if out_shape else None
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise AutotlError(
                f"model file {self.onnx_path} has {n_out} outputs but its card {card_path_for(self.onnx_path)} "
                f"lists {len(self.classes)} classes; the card belongs to another model: use the model.json written with it"
            )

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def preprocessing(self) -> dict:
        return self.card.preprocessing

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed float32 ``(N, 3, H, W)`` -> logits ``(N, n_classes)``."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        return self.session.run(None, {self.input_name: x})[0]

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> class probabilities ``(N, n_classes)`` (float64)."""
        return softmax(self.logits(preprocess_batch(list(images), self.preprocessing)), axis=1)

    def stream(self, paths: str | os.PathLike | Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 32,
               workers: int | None = None, path_column: str | None = None) -> Iterator[tuple[list[dict], list[dict]]]:
        """(predictions, unreadable images) batch by batch, in path order, as they are computed.

        ``workers`` threads (default: one per core) decode and preprocess the next batches while
        onnxruntime runs this one (Pillow and numpy release the GIL); at most ``workers + 1``
        batches are in flight, so memory stays bounded however many images there are."""
        if int(top_k) < 1:
            raise AutotlError(f"--top-k {top_k}: must be at least 1")
        if int(batch_size) < 1:
            raise AutotlError(f"--batch-size {batch_size}: must be at least 1")
        unsupported: list[dict] = []
        files = expand_image_paths(paths, unsupported, path_column=path_column)
        if unsupported:  # listed with the reason, like unreadable images
            yield [], unsupported
        k = min(int(top_k), len(self.classes))
        classes = np.asarray(self.classes, dtype=object)
        workers = max(1, int(workers or _cores()))
        chunks = iter([files[i:i + int(batch_size)] for i in range(0, len(files), int(batch_size))])
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autotl-decode")
        try:
            pending = collections.deque(pool.submit(_decode, chunk, self._prep) for chunk in itertools.islice(chunks, workers + 1))
            with progress("predicting", total=len(files)) as task:
                while pending:
                    batch, ok_paths, errors = pending.popleft().result()
                    nxt = next(chunks, None)
                    if nxt is not None:
                        pending.append(pool.submit(_decode, nxt, self._prep))
                    predictions = []
                    if batch is not None:
                        probs = softmax(self.logits(batch), axis=1)
                        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                        top_p = np.take_along_axis(probs, order, axis=1)
                        for f, labels, ps in zip(ok_paths, classes[order].tolist(), top_p.tolist()):
                            predictions.append({"path": str(f), "top": [{"label": l, "prob": p} for l, p in zip(labels, ps)]})
                    task.advance(len(ok_paths) + len(errors))
                    yield predictions, errors
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def predict_paths(self, paths: str | os.PathLike | Iterable[str | os.PathLike], top_k: int = 5,
                      batch_size: int = 32, *, csv: str | os.PathLike | None = None, keep: int | None = None,
                      workers: int | None = None, path_column: str | None = None) -> PredictionResult:
        """Classify image files, folders (recursively) and label files' path columns (``path_column``:
        see ``expand_image_paths``); unreadable images land in ``errors``.

        ``csv``: every row is written to that file as it is computed (the file appears, complete,
        when the last image is done). ``keep``: hold at most this many predictions in the result
        (``n_images`` still counts all), so a folder of any size runs in bounded memory."""
        k = min(max(1, int(top_k)), len(self.classes))
        result = PredictionResult(classes=list(self.classes), model=str(self.onnx_path), top_k=k, n_total=0)
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(_CsvStream(csv, k)) if csv is not None else None
            for predictions, errors in self.stream(paths, top_k=top_k, batch_size=batch_size, workers=workers,
                                                   path_column=path_column):
                result.n_total += len(predictions)
                result.errors += errors
                if writer is not None:
                    writer.rows(predictions)
                room = len(predictions) if keep is None else max(0, int(keep) - len(result.predictions))
                result.predictions += predictions[:room]
            if writer is not None:
                writer.errors(result.errors)
        return result


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode(files: Sequence[Path], p: _Prep) -> tuple[np.ndarray | None, list[Path], list[dict]]:
    """One batch of files -> (preprocessed batch or None, the files in it, the unreadable ones)."""
    pixels, ok, errors = [], [], []
    for f in files:
        try:
            pixels.append(np.asarray(_geometry(load_rgb(f, min_side=p.min_side), p)))
            ok.append(f)
        except UnreadableImageError as exc:
            errors.append({"path": str(f), "reason": exc.reason})
    return (_normalise(np.stack(pixels), p) if pixels else None), ok, errors


class _CsvStream:
    """``PredictionResult.csv_text``'s format, written row by row into a temporary file that
    replaces ``path`` when the run completes (an interrupted run leaves no half file)."""

    def __init__(self, path: str | os.PathLike, k: int):
        from autotl.options import check_out_file

        check_out_file("--csv", path, "predictions.csv")
        self.path, self.k = Path(path), k
        self.header = ["path", "label", "prob", *[f"top{i}_{w}" for i in range(1, k + 1) for w in ("label", "prob")], "error"]

    def __enter__(self) -> "_CsvStream":
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._fh = open(tmp, "w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._fh, lineterminator="\n")
        self._writer.writerow(self.header)
        return self

    def rows(self, predictions: list[dict]) -> None:
        self._writer.writerows(_csv_rows(predictions, len(self.header)))
        self._fh.flush()

    def errors(self, errors: list[dict]) -> None:
        self._writer.writerows(_error_rows(errors, len(self.header)))

    def __exit__(self, *exc) -> None:
        self._fh.close()
        self._atomic.__exit__(*exc)


def _csv_rows(predictions: list[dict], width: int) -> list[list[str]]:
    rows = []
    for p in predictions:
        top = p["top"]
        row = [p["path"], top[0]["label"], _fmt_prob(top[0]["prob"])]
        for t in top:
            row += [t["label"], _fmt_prob(t["prob"])]
        row += [""] * (width - 1 - len(row))
        rows.append(safe_row(row + [""]))
    return rows


def _error_rows(errors: list[dict], width: int) -> list[list[str]]:
    return [safe_row([e["path"]] + [""] * (width - 2) + [e["reason"]]) for e in errors]


def predict(model_path: str | os.PathLike, paths: str | os.PathLike | Iterable[str | os.PathLike],
            top_k: int = 5, batch_size: int = 32, *, csv: str | os.PathLike | None = None, keep: int | None = None,
            workers: int | None = None, path_column: str | None = None) -> PredictionResult:
    """Classify image files / folders / label files of paths with an exported ``model.onnx`` or
    ``model.int8.onnx`` (or their folder); ``csv``/``keep``/``workers``/``path_column`` as in
    ``Predictor.predict_paths``."""
    from autotl.options import check_predict_options

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    check_predict_options(top_k=top_k, batch_size=batch_size, csv=csv, model_path=model_path, paths=paths,
                          path_column=path_column)
    return Predictor(model_path).predict_paths(paths, top_k=top_k, batch_size=batch_size, csv=csv, keep=keep,
                                               workers=workers, path_column=path_column)
