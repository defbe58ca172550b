"""Selective joint fine-tuning as a transfer strategy: its parameters and run-wide options are
``autotl.options.RetrievalOptions`` (``retrieval_k``, ``retrieval_bank``, ``source_loss_weight``,
``source_head_init``: ``imagenet`` starts the source head from the source model's ImageNet
classifier rows of the pool's wnid classes, ``random`` from a random initialisation as the paper
does; both searchable; ``source_pool`` (required), ``retrieval_rounds``, ``retrieval_mode``
(``knn``, or ``random`` for the ablation), ``source_weights`` (``auto``: DATL w(y) when ``autotl
score`` saved them in the run folder, else uniform; ``datl``; ``uniform``) and ``retrieval_cache_dir``).

``apply``: scan the pool, fit the equal-mass bins on the target *training split* (the full split,
so a data-dropout subset does not change the descriptors), describe the pool and the target
images (disk cache + in-memory memo across trials), search the exact K-NN under eq. (1), and add
the joint fine-tuning hooks to the training loop (``ctx.hooks``). On the final fit it writes ``retrieval.csv`` (rewritten
after training with the neighbours the hard-sample rounds added) and ``retrieval.jpg`` (a few
target images with their nearest pool images).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._console import log
from .._memory import BoundedMemory
from ..errors import AutotlError
from ..options import RetrievalOptions, parse_retrieval_k
from ..strategy import BaseStrategy, StrategyContext
from .joint import JointData, random_neighbours, joint_hooks, write_retrieval_csv
from .neighbours import get_retrieval
from .pool import SourcePool, pool_class_weights, scan_pool, without_data_copies
from .schedule import HardSampleSchedule

__all__ = ["SelectiveJointFineTuning", "load_pool", "data_free_pool", "retrieval_cache_dir", "write_contact_sheet"]

DEFAULT_BANK = RetrievalOptions.retrieval_bank
DEFAULT_SOURCE_WEIGHT = RetrievalOptions.source_loss_weight


def retrieval_cache_dir(ctx: StrategyContext) -> Path | None:
    """Where descriptors are cached (None: nowhere writable, computed each time)."""
    explicit = RetrievalOptions.of(ctx.options).retrieval_cache_dir
    if explicit:
        return Path(explicit)
    base = getattr(ctx.extractor, "cache_dir", None)
    if base is None:
        from ..run import resolve_cache_dir

        base = resolve_cache_dir(None)
    return Path(base) / "retrieval" if base is not None else None


def load_pool(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              memory: BoundedMemory | None = None) -> SourcePool:
    """``scan_pool``, kept per folder in ``memory`` (a run's: the trials of a search scan once)."""
    key = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if memory is None:
        return scan_pool(key, cache_dir=cache_dir)
    return memory.part("pools", 4).get(key, lambda: scan_pool(key, cache_dir=cache_dir))


def data_free_pool(root: str | os.PathLike, index, cache_dir: str | os.PathLike | None = None,
                   memory: BoundedMemory | None = None) -> tuple[SourcePool, list]:
    """The pool at ``root`` without its copies of the data set's images (train, val and test, by
    content): (pool, ``[{"pool", "data"}]``); both steps kept in ``memory``."""
    return without_data_copies(load_pool(root, cache_dir, memory), [*index.train, *index.val, *index.test], memory)


def _class_weights(ctx: StrategyContext, pool: SourcePool) -> tuple[np.ndarray | None, str]:
    mode = str(RetrievalOptions.of(ctx.options).source_weights).lower()
    if mode == "uniform":
        return None, "uniform"
    try:
        from ..score import load_datl_weights

        p_t, names = load_datl_weights(ctx.run_dir, ctx.source.label, field="p_t")  # P_s: the pool's own
    except (ImportError, AutotlError, OSError, KeyError, ValueError) as exc:
        if mode == "datl":
            raise AutotlError(f"source_weights datl: {exc}") from exc
        return None, "uniform (no DATL weights in the run folder)"
    weights, info = pool_class_weights(pool, p_t, names)
    if info["matched_classes"] == 0:
        if mode == "datl":
            raise AutotlError(f"source_weights datl: no pool class matches a class of {ctx.source.label}'s source head")
        return None, "uniform (no pool class matches the DATL classes)"
    return weights, (f"datl: w = P_t / P_s, P_s = the pool's class distribution "
                     f"({info['matched_classes']}/{pool.num_classes} classes matched)")


class SelectiveJointFineTuning(BaseStrategy):
    """Ge & Yu 2017: train the target task jointly with a source task on retrieved similar pool images."""

    name = "retrieval"
    params = RetrievalOptions.params()

    def is_active(self, params: dict[str, Any]) -> bool:
        return _k0(params) > 0

    def describe(self, params: dict[str, Any]) -> str:
        k = _k0(params)
        if k <= 0:
            return "retrieval: off"
        return (f"retrieval: K0={k}, bank={params.get('retrieval_bank') or DEFAULT_BANK}, "
                f"source loss x{float(params.get('source_loss_weight', DEFAULT_SOURCE_WEIGHT)):g}"
                + (f", source head {params['source_head_init']}" if params.get("source_head_init") else ""))

    def apply(self, ctx: StrategyContext, params: dict[str, Any]) -> None:
        k0 = _k0(params)
        if k0 <= 0:
            return
        opts = RetrievalOptions.of(ctx.options, params)
        root = opts.source_pool
        if not root:
            raise AutotlError(f"retrieval_k={k0} needs a source pool to retrieve from: give --source-pool DIR "
                              "(one sub-folder of images per source class), or set retrieval_k to 0")
        opts.check()
        bank, weight, rounds = str(opts.retrieval_bank).lower(), float(opts.source_loss_weight), int(opts.retrieval_rounds)
        mode, head_init = str(opts.retrieval_mode).lower(), str(opts.source_head_init).lower()

        t0 = time.monotonic()
        cache = retrieval_cache_dir(ctx)
        pool, copies = data_free_pool(root, ctx.index, cache, ctx.memory)
        retr, memory_hit = get_retrieval(pool, bank, ctx.index.train, source_model=ctx.source.model, cache_dir=cache,
                                         memory=ctx.memory)
        train = list(ctx.train_samples)
        k_search = min(HardSampleSchedule(k0, max_rounds=rounds).max_count, len(pool))
        knn = retr.neighbours(train, k_search)
        neighbours = retr.neighbours if mode == "knn" else random_neighbours(len(pool), seed=ctx.config.seed)
        class_weights, weights_used = _class_weights(ctx, pool)
        notes: dict[str, Any] = {
            "pool": str(pool.root), "pool_images": len(pool), "pool_classes": pool.num_classes,
            "pool_skipped": len(pool.skipped), "pool_data_copies_excluded": len(copies), "pool_imagenet_classes": sum(i is not None for i in pool.imagenet_index),
            "k0": k0, "bank": bank, "source_loss_weight": weight, "max_rounds": rounds, "mode": mode,
            "source_weights": weights_used, "source_head_init": head_init,
            "initial_pool_images": int(np.unique(knn.indices[:, :min(k0, k_search)].numpy()).size) if len(train) else 0,
            "retrieval_seconds": round(time.monotonic() - t0, 3), "memory_hit": memory_hit,
            **retr.describe_state(),
        }
        ctx.notes[self.name] = notes
        data = JointData(pool=pool, neighbours=neighbours, k0=k0, source_weight=weight, max_rounds=rounds,
                         class_weights=class_weights, source_head_init=head_init,
                         target_classes=list(ctx.index.classes), notes=notes, memory=ctx.memory)
        if ctx.final:
            csv_path = ctx.run_dir / "retrieval.csv"
            shown = knn if mode == "knn" else neighbours(train, k_search)
            write_retrieval_csv(csv_path, train, pool, shown, [HardSampleSchedule(k0).initial_counts(len(train)).clamp(max=k_search)],
                                ctx.index.classes)
            data.csv_path = csv_path
            notes["csv"] = str(csv_path)
            try:
                notes["contact_sheet"] = str(write_contact_sheet(ctx.run_dir / "retrieval.jpg", train, pool, shown))
            except Exception as exc:  # noqa: BLE001 - a picture is a nicety
                notes["contact_sheet_error"] = f"{type(exc).__name__}: {exc}"
        hooks = joint_hooks(data, ctx.source, ctx.train_samples, len(ctx.index.classes), ctx.config, ctx.extractor)
        if hooks is not None:
            ctx.hooks.append(hooks)
        log(f"retrieval: K0={k0} ({bank}) over {len(pool)} pool images: {notes['initial_pool_images']} distinct "
            f"neighbours for {len(train)} target images" + (" [random ablation]" if mode == "random" else "")
            + f" ({'memory' if memory_hit else 'cache hit' if retr.pool_cache_hit else 'computed'}, {notes['retrieval_seconds']:.1f}s)")


def _k0(params: dict[str, Any]) -> int:
    return parse_retrieval_k(params.get("retrieval_k"))


def write_contact_sheet(path: str | os.PathLike, targets: Sequence, pool: SourcePool, knn, *, rows: int = 6,
                        per_row: int = 6, tile: int = 96) -> Path:
    """A JPEG: up to ``rows`` target images (spread over the classes), each followed by its
    nearest pool images in rank order."""
    from PIL import Image

    from .._io import atomic_path
    from .descriptors import load_image

    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t.label, []).append(i)
    picked: list[int] = []
    while len(picked) < min(rows, len(targets)):
        for c in sorted(by_class):
            if by_class[c] and len(picked) < rows:
                picked.append(by_class[c].pop(0))
    k = min(per_row - 1, knn.indices.shape[1])
    gap = 6
    sheet = Image.new("RGB", (tile * (k + 1) + gap, tile * max(1, len(picked))), (255, 255, 255))
    for r, i in enumerate(picked):
        sheet.paste(Image.fromarray(load_image(targets[i].path, tile)), (0, r * tile))
        for c in range(k):
            j = int(knn.indices[i, c])
            sheet.paste(Image.fromarray(load_image(pool.samples[j].path, tile)), (gap + tile * (c + 1), r * tile))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)
    return path
