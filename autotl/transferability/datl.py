"""DATL label-distribution importance weights (Ngiam et al. 2018, "Domain adaptive transfer
learning with specialist models", arXiv:1811.07056).

The source model classifies every target image; averaging its softmax outputs gives
P_t(y), how much of the target set looks like source class y. With P_s(y) the source label
prior (fraction of source training images in class y) the importance weight of source class y
is w(y) = P_t(y) / P_s(y). By construction E_{P_s}[w] = sum_y P_s(y) w(y) = sum_y P_t(y) = 1.

Relevance score (one number per source model): KL(P_t || P_s) in nats,

    score = sum_y P_t(y) log(P_t(y) / P_s(y)) = E_{P_t}[log w]  >= 0.

It is 0 when the target set spreads over the source classes exactly like the source data does
(the source head sees nothing specific in the target) and grows as the target mass concentrates
on a few source classes (log C_s at most for a uniform P_s: all mass on one class). Higher means
the target resembles a narrow, identifiable part of the source data, the situation in which DATL
found re-weighted pre-training to help most. It measures label-distribution overlap, not
transferability; use it next to LogME / LEEP / H-score, not instead of them.

P_s when a source pool is trained on (``pool_importance_weights``): the paper's P_s is the class
distribution of the images the source loss actually draws from, so with ``--source-pool`` it is the
pool's own class counts (not the source head's training prior, which for an ImageNet head without
bundled counts is uniform). P_t is restricted to the source classes the pool has and renormalised.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AutotlError
from ._rank import _as_float64, _check_probs, _to_numpy

__all__ = [
    "DatlWeights",
    "datl_weights",
    "pool_importance_weights",
    "softmax",
    "load_prior",
]


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64 (subtracts the row max before exp)."""
    z = np.array(_to_numpy(logits), dtype=np.float64)  # a copy, safe to modify
    if z.ndim == 0 or z.size == 0:
        raise ValueError(f"logits must be a non-empty array, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


@dataclass(frozen=True, eq=False)
class DatlWeights:
    """DATL statistics of one source model on one target set (all arrays shape (C_s,)).

    p_t: mean source-head softmax over target images; p_s: source label prior;
    w = p_t / p_s: importance weight per source class (sum(p_s * w) == 1);
    score: KL(p_t || p_s) in nats (see module doc); score_name: "kl_pt_ps".
    """

    p_t: np.ndarray
    p_s: np.ndarray
    w: np.ndarray
    score: float
    score_name: str = "kl_pt_ps"

    def _top(self, k: int, by: str = "p_t") -> np.ndarray:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if by not in ("p_t", "w"):
            raise ValueError(f"by must be 'p_t' or 'w', got {by!r}")
        k = min(int(k), self.p_t.size)
        # stable sort on -p_t (or -w): ties keep the lower class index first
        return np.argsort(-(self.p_t if by == "p_t" else self.w), kind="stable")[:k]

    def top_mass(self, k: int) -> float:
        """Mass of P_t on its k most probable source classes (in [0, 1])."""
        return float(self.p_t[self._top(k)].sum())

    def top_classes(
        self, k: int, class_names: Sequence[str] | None = None, by: str = "p_t"
    ) -> list[tuple[int, str, float, float]]:
        """The k source classes with the largest P_t (``by="w"``: the largest importance weight
        w = P_t / P_s; the same order when P_s is uniform), as (index, name, w, p_t), largest first.

        Without `class_names` the name is the index as a string.
        """
        if class_names is not None and len(class_names) != self.p_t.size:
            raise ValueError(
                f"class_names has {len(class_names)} names but the source head has "
                f"{self.p_t.size} classes"
            )
        out = []
        for i in self._top(k, by).tolist():
            name = str(class_names[i]) if class_names is not None else str(i)
            out.append((int(i), name, float(self.w[i]), float(self.p_t[i])))
        return out


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def datl_weights(source_probs: Any, source_prior: Any) -> DatlWeights:
    """DATL weights from the source-head softmax on target images.

    source_probs: (N, C_s) probabilities (use `softmax(source_logits)`); source_prior: (C_s,)
    positive class prior (counts are fine: it is normalised here).
    """
    probs = _as_float64(source_probs, "source_probs", 2)
    _check_probs(probs, "source_probs")
    prior = _as_float64(source_prior, "source_prior", 1)
    if prior.shape[0] != probs.shape[1]:
        raise ValueError(
            f"source_prior has {prior.shape[0]} classes but source_probs has {probs.shape[1]}"
        )
    if (prior <= 0).any():
        raise ValueError("source_prior must be > 0 for every source class (w = P_t / P_s)")
    p_s = prior / prior.sum()
    p_t = probs.mean(axis=0)
    p_t = np.clip(p_t, 0.0, None)
    p_t /= p_t.sum()
    w = p_t / p_s
    return DatlWeights(p_t=p_t, p_s=p_s, w=w, score=_kl(p_t, p_s), score_name="kl_pt_ps")


def pool_importance_weights(p_t: Any, source_index: Sequence[int | None], pool_counts: Any
                            ) -> tuple[np.ndarray, np.ndarray]:
    """DATL weight w(c) = P_t(y_c) / P_s(y_c) of every pool class c, with P_s the pool's class distribution.

    ``p_t``: (C_s,) target distribution over the source head's classes (``DatlWeights.p_t``);
    ``source_index``: per pool class, the source class it is (or None: no match); ``pool_counts``:
    images per pool class. Over the matched pool classes M, P_t is restricted to their source
    classes and rescaled to the pool share P_s(M) they hold, so the weight is exactly
    P_t(y | M) / P_s(y | M); unmatched classes keep weight 1. Pool classes naming the same source
    class share its P_t and P_s. Hence sum_c P_s(c) w(c) = 1: the mean weight over the pool images is
    1 and the source loss keeps its scale. Returns (w, p_s) per pool class, both (C_pool,); w is all
    ones when nothing matches or P_t gives the matched classes no mass.
    """
    pt = _as_float64(p_t, "p_t", 1)
    counts = _as_float64(pool_counts, "pool_counts", 1)
    if len(source_index) != counts.size:
        raise ValueError(f"source_index has {len(source_index)} entries for {counts.size} pool classes")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("pool_counts must be >= 0 with at least one image")
    p_s = counts / counts.sum()
    w = np.ones(counts.size)
    matched = [c for c, y in enumerate(source_index) if y is not None]
    if any(not 0 <= int(source_index[c]) < pt.size for c in matched):
        raise ValueError(f"source_index must lie in [0, {pt.size})")
    # per source class y present in the pool: its pool share P_s(y) and target mass P_t(y)
    ps_y: dict[int, float] = {}
    for c in matched:
        ps_y[int(source_index[c])] = ps_y.get(int(source_index[c]), 0.0) + p_s[c]
    pt_mass = float(sum(max(pt[y], 0.0) for y in ps_y))
    if not ps_y or pt_mass <= 0:
        return w, p_s
    share = sum(ps_y.values())  # P_s(M)
    for c in matched:
        y = int(source_index[c])
        w[c] = share * max(pt[y], 0.0) / pt_mass / ps_y[y] if ps_y[y] > 0 else 0.0
    return w, p_s


# --------------------------------------------------------------------------- source priors


def _parse_count(text: str) -> float:
    v = float(text)
    if not np.isfinite(v):
        raise ValueError(f"not a finite number: {text!r}")
    return v


def _read_counts(path: Path) -> dict[str, float]:
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise AutotlError(
            f"{path}: cannot read the source class-count file ({e.__class__.__name__}); "
            "pass a readable UTF-8 text/CSV/JSON file of class counts"
        ) from None
    fmt_fix = (
        "write one 'class name,count' per line (CSV/text) or a JSON object {\"class name\": count}"
    )
    stripped = raw.strip()
    if path.suffix.lower() == ".json" or stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise AutotlError(
                f"{path}: invalid JSON ({e.msg} at line {e.lineno}); {fmt_fix}"
            ) from None
        if not isinstance(data, dict):
            raise AutotlError(f"{path}: JSON must be an object of class counts; {fmt_fix}")
        counts: dict[str, float] = {}
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AutotlError(
                    f"{path}: count for class {name!r} is not a number ({value!r}); {fmt_fix}"
                )
            try:
                counts[str(name)] = _parse_count(str(value))
            except ValueError:
                raise AutotlError(
                    f"{path}: count for class {name!r} is not finite ({value!r}); {fmt_fix}"
                ) from None
        return counts

    counts = {}
    first_data_line = True
    for lineno, line in enumerate(io.StringIO(raw), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # the count is the last field; the name may itself contain commas or spaces
        if "\t" in line:
            name, count_text = (s.strip() for s in line.rsplit("\t", 1))
        elif "," in line:
            row = next(csv.reader([line]))
            name, count_text = ",".join(row[:-1]).strip(), row[-1].strip()
        else:
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise AutotlError(
                    f"{path}:{lineno}: expected 'class name,count', got {line!r}; {fmt_fix}"
                )
            name, count_text = parts[0].strip(), parts[1].strip()
        try:
            value = _parse_count(count_text)
        except ValueError:
            if first_data_line:  # a header such as "class,count"
                first_data_line = False
                continue
            raise AutotlError(
                f"{path}:{lineno}: count {count_text!r} is not a number; {fmt_fix}"
            ) from None
        first_data_line = False
        if not name:
            raise AutotlError(f"{path}:{lineno}: empty class name; {fmt_fix}")
        if name in counts:
            raise AutotlError(
                f"{path}:{lineno}: class {name!r} listed twice; keep one line per class"
            )
        counts[name] = value
    if not counts:
        raise AutotlError(f"{path}: no class counts found; {fmt_fix}")
    return counts


def load_prior(path: str | Path, class_names: Sequence[str]) -> np.ndarray:
    """Source label prior from a class-count file, in the order of `class_names`.

    Formats: text/CSV with one `class name,count` per line (also `name<TAB>count` or
    `name count`; the count is the last field, `#` comments and one header line are skipped),
    or JSON `{"class name": count}`. Every class of `class_names` must be listed with a
    count > 0 (w = P_t / P_s needs P_s > 0); extra classes in the file are ignored.
    Problems raise `AutotlError` naming the file and the fix.
    """
    path = Path(path)
    counts = _read_counts(path)
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty")
    missing = [n for n in names if n not in counts]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise AutotlError(
            f"{path}: {len(missing)} of the source model's {len(names)} classes have no count "
            f"({shown}); add a 'class name,count' entry for each, spelled as the model names them"
        )
    values = np.array([counts[n] for n in names], dtype=np.float64)
    bad = [n for n, v in zip(names, values) if v < 0]
    if bad:
        raise AutotlError(
            f"{path}: negative count for class {bad[0]!r}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + "; counts are numbers of training images, fix them to be >= 1"
        )
    zero = [n for n, v in zip(names, values) if v == 0]
    if zero:
        raise AutotlError(
            f"{path}: count 0 for class {zero[0]!r}"
            + (f" (and {len(zero) - 1} more)" if len(zero) > 1 else "")
            + "; every class of the source head needs a count >= 1 (DATL divides by P_s)"
        )
    return values / values.sum()
