"""Pure-math tests of autotl.transferability: DATL weights, priors, LogME, LEEP, H-score, ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from autotl.errors import AutotlError
from autotl.transferability import (
    combine_ranks,
    datl_weights,
    hscore,
    kendall_tau,
    ledoit_wolf_shrinkage,
    leep,
    load_prior,
    log_evidence,
    logme,
    logme_fit,
    softmax,
)


def _blobs(rng, n=120, d=16, k=3, sep=4.0):
    labels = np.arange(n) % k
    centers = rng.normal(size=(k, d)) * sep
    return centers[labels] + rng.normal(size=(n, d)), labels


# --------------------------------------------------------------------------- softmax / DATL


def test_softmax_stable_and_torch():
    z = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], softmax(np.array([1.0, 2.0, 0.0])))
    np.testing.assert_allclose(p[1], [1 / 3] * 3)
    np.testing.assert_allclose(softmax(torch.tensor(z, dtype=torch.float32)), p, rtol=1e-6)


def test_datl_weights_definition():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(50, 6)) * 2)
    counts = np.array([10.0, 20.0, 30.0, 5.0, 15.0, 20.0])
    d = datl_weights(probs, counts)
    p_s = counts / counts.sum()
    np.testing.assert_allclose(d.p_s, p_s)
    np.testing.assert_allclose(d.p_t, probs.mean(axis=0))
    np.testing.assert_allclose(d.w, d.p_t / d.p_s)  # w = P_t / P_s elementwise
    assert math.isclose(float(np.sum(d.p_s * d.w)), 1.0, rel_tol=0, abs_tol=1e-12)  # E_Ps[w] = 1
    kl = float(np.sum(d.p_t * np.log(d.p_t / p_s)))
    assert d.score_name == "kl_pt_ps"
    assert math.isclose(d.score, kl, rel_tol=1e-12)
    # torch input, float32 -> same result in float64
    dt = datl_weights(torch.tensor(probs, dtype=torch.float64), torch.tensor(counts))
    np.testing.assert_allclose(dt.w, d.w)


def test_datl_score_zero_when_target_matches_prior_and_grows_with_concentration():
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    same = datl_weights(np.tile(prior, (5, 1)), prior)
    assert abs(same.score) < 1e-12
    np.testing.assert_allclose(same.w, 1.0)
    spread = datl_weights(softmax(np.eye(4) * 1.0), prior)
    peaked = datl_weights(np.tile([0.97, 0.01, 0.01, 0.01], (5, 1)), prior)
    assert peaked.score > spread.score > 0


def test_datl_top_classes_and_mass():
    probs = np.array([[0.1, 0.5, 0.1, 0.3], [0.1, 0.3, 0.2, 0.4]])  # p_t = [.1, .4, .15, .35]
    prior = np.array([0.25, 0.5, 0.125, 0.125])
    d = datl_weights(probs, prior)
    top = d.top_classes(3, ["cat", "dog", "fish", "bird"])
    assert [t[0] for t in top] == [1, 3, 2]
    assert [t[1] for t in top] == ["dog", "bird", "fish"]
    np.testing.assert_allclose([t[3] for t in top], [0.4, 0.35, 0.15])
    np.testing.assert_allclose([t[2] for t in top], [0.8, 2.8, 1.2])  # w = p_t / p_s
    assert d.top_classes(2)[0][1] == "1"  # no names: the index as a string
    # by importance weight w = p_t / p_s = [0.4, 0.8, 1.2, 2.8]
    assert [t[0] for t in d.top_classes(3, by="w")] == [3, 2, 1]
    with pytest.raises(ValueError):
        d.top_classes(2, by="mass")
    assert math.isclose(d.top_mass(2), 0.75)
    assert math.isclose(d.top_mass(10), 1.0)
    assert d.top_mass(0) == 0.0
    with pytest.raises(ValueError):
        d.top_classes(2, ["too", "few"])


def test_datl_rejects_logits_and_bad_prior():
    with pytest.raises(ValueError, match="softmax"):
        datl_weights(np.array([[2.0, -1.0, 0.5]]), np.ones(3))
    with pytest.raises(ValueError):
        datl_weights(np.full((2, 3), 1 / 3), np.ones(4))
    with pytest.raises(ValueError):
        datl_weights(np.full((2, 3), 1 / 3), np.array([1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------- priors


def test_load_prior_formats(tmp_path):
    names = ["tench, Tinca tinca", "goldfish", "great white shark"]
    csv_file = tmp_path / "counts.csv"
    csv_file.write_text(
        "# source class counts\nclass,count\n"
        "tench, Tinca tinca,100\n"
        '"great white shark",300\n'
        "goldfish,100\n"
        "unused class,7\n"
    )
    np.testing.assert_allclose(load_prior(csv_file, names), [0.2, 0.2, 0.6])
    tsv = tmp_path / "counts.txt"
    tsv.write_text("tench, Tinca tinca\t1\ngoldfish\t1\ngreat white shark\t2\n")
    np.testing.assert_allclose(load_prior(tsv, names), [0.25, 0.25, 0.5])
    js = tmp_path / "counts.json"
    js.write_text(json.dumps({"goldfish": 2, "tench, Tinca tinca": 1, "great white shark": 1}))
    np.testing.assert_allclose(load_prior(js, names), [0.25, 0.5, 0.25])
    spaces = tmp_path / "spaces.txt"
    spaces.write_text("a 3\nb 1\n")
    np.testing.assert_allclose(load_prior(spaces, ["a", "b"]), [0.75, 0.25])


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("missing.csv", "a,1\nb,2\n", "no count"),
        ("negative.csv", "a,1\nb,-2\nc,3\n", "negative"),
        ("zero.json", '{"a": 1, "b": 0, "c": 2}', "count 0"),
        ("bad_number.csv", "a,1\nb,many\nc,3\n", "not a number"),
        ("bad.json", '{"a": 1,', "invalid JSON"),
        ("duplicate.csv", "a,1\na,2\nb,1\nc,1\n", "twice"),
        ("empty.csv", "# nothing\n", "no class counts"),
    ],
)
def test_load_prior_errors(tmp_path, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(AutotlError, match=match) as exc:
        load_prior(f, ["a", "b", "c"])
    msg = str(exc.value)
    assert name in msg and "\n" not in msg


def test_load_prior_unreadable(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(AutotlError, match="nope.csv"):
        load_prior(missing, ["a"])
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(AutotlError, match="binary.csv"):
        load_prior(binary, ["a"])


# --------------------------------------------------------------------------- LogME


def test_log_evidence_matches_gaussian_marginal():
    # y ~ N(0, beta^-1 I + alpha^-1 F F^T): an independent formula for the evidence
    rng = np.random.default_rng(1)
    F = rng.normal(size=(12, 4))
    y = rng.normal(size=12)
    alpha, beta = 0.7, 2.3
    C = np.eye(12) / beta + F @ F.T / alpha
    _, logdet = np.linalg.slogdet(C)
    direct = -0.5 * (12 * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(C, y))
    assert math.isclose(log_evidence(F, y, alpha, beta), direct, rel_tol=1e-10)


def test_logme_fixed_point_is_the_evidence_maximum():
    rng = np.random.default_rng(2)
    n, d = 20, 5
    F = rng.normal(size=(n, d))
    labels = np.arange(n) % 2
    F[:, 0] += 1.5 * labels  # some signal, so the maximum is interior
    res = logme_fit(F, labels)
    assert res.converged
    for k in range(2):
        y = (labels == k).astype(float)
        a, b = res.alpha[k], res.beta[k]
        best = log_evidence(F, y, a, b)
        assert math.isclose(res.evidence[k] * n, best, rel_tol=1e-10)
        grid = np.exp(np.linspace(-0.5, 0.5, 11))
        for fa in grid:
            for fb in grid:
                assert log_evidence(F, y, a * fa, b * fb) <= best + 1e-9
    assert math.isclose(res.score, float(np.mean(res.evidence)))
    assert math.isclose(logme(F, labels), res.score)


def test_logme_n_smaller_than_d_matches_direct_evidence():
    rng = np.random.default_rng(3)
    F = rng.normal(size=(10, 30))
    labels = np.arange(10) % 3
    res = logme_fit(F, labels)
    assert np.isfinite(res.score)
    for k in range(3):
        y = (labels == k).astype(float)
        direct = log_evidence(F, y, res.alpha[k], res.beta[k])
        assert math.isclose(res.evidence[k] * 10, direct, rel_tol=1e-8)


def test_logme_invariances_and_inputs():
    rng = np.random.default_rng(4)
    F, labels = _blobs(rng, n=90, d=12, k=3, sep=1.0)
    base = logme(F, labels)
    perm = rng.permutation(F.shape[1])
    assert math.isclose(logme(F[:, perm], labels), base, rel_tol=1e-9)
    assert math.isclose(logme(F, labels + 10), base, rel_tol=1e-12)  # label values don't matter
    t = logme(torch.tensor(F, dtype=torch.float32), torch.tensor(labels))
    assert math.isclose(t, base, rel_tol=1e-4)


def test_logme_prefers_separating_features():
    rng = np.random.default_rng(5)
    good, labels = _blobs(rng, n=150, d=20, k=3, sep=3.0)
    noise = rng.normal(size=good.shape) * good.std()
    assert logme(good, labels) > logme(noise, labels) + 0.1


# --------------------------------------------------------------------------- LEEP


def test_leep_hand_computed():
    theta = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    y = np.array([0, 0, 1, 1])
    # joint P(y, z) = (1/4) sum_i theta_iz 1[y_i = y]:
    #   y=0: [0.8, 0.8, 0.4] / 4 = [0.2, 0.2, 0.1];  y=1: [0.4, 0.5, 1.1] / 4 = [0.1, 0.125, 0.275]
    # P(z) = [0.3, 0.325, 0.375]
    # P(y=0|z) = [2/3, 8/13, 4/15];  P(y=1|z) = [1/3, 5/13, 11/15]
    eep = [
        0.6 * 2 / 3 + 0.3 * 8 / 13 + 0.1 * 4 / 15,
        0.2 * 2 / 3 + 0.5 * 8 / 13 + 0.3 * 4 / 15,
        0.1 * 1 / 3 + 0.2 * 5 / 13 + 0.7 * 11 / 15,
        0.3 * 1 / 3 + 0.3 * 5 / 13 + 0.4 * 11 / 15,
    ]
    expected = sum(math.log(e) for e in eep) / 4  # = -0.57306924...
    assert math.isclose(leep(theta, y), expected, rel_tol=1e-12)
    assert math.isclose(expected, -0.5730692401641158, rel_tol=1e-12)


def test_leep_bounds():
    rng = np.random.default_rng(6)
    probs = softmax(rng.normal(size=(40, 7)))
    labels = rng.integers(0, 3, size=40)
    assert leep(probs, labels) <= 0.0
    # a source head whose classes map one-to-one onto target classes: LEEP = 0
    onehot = np.eye(3)[[0, 1, 2, 1, 0]]
    assert abs(leep(onehot, [2, 0, 1, 0, 2])) < 1e-12
    with pytest.raises(ValueError, match="softmax"):
        leep(rng.normal(size=(5, 3)), [0, 1, 0, 1, 0])


# --------------------------------------------------------------------------- H-score


def test_ledoit_wolf_matches_explicit_formula():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(15, 6)) @ rng.normal(size=(6, 6))
    n, d = X.shape
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    mu = np.trace(S) / d
    delta2 = np.linalg.norm(S - mu * np.eye(d), "fro") ** 2 / d
    b2_bar = sum(np.linalg.norm(np.outer(x, x) - S, "fro") ** 2 for x in Xc) / n**2 / d
    alpha_ref = min(b2_bar, delta2) / delta2
    alpha, shrunk = ledoit_wolf_shrinkage(X)
    assert 0.0 <= alpha <= 1.0
    assert math.isclose(alpha, alpha_ref, rel_tol=1e-10)
    np.testing.assert_allclose(shrunk, (1 - alpha) * S + alpha * mu * np.eye(d), rtol=1e-12)


def test_hscore_prefers_discriminative_features():
    rng = np.random.default_rng(8)
    good, labels = _blobs(rng, n=150, d=20, k=3, sep=3.0)
    noise = rng.normal(size=good.shape) * good.std()
    for shrink in (True, False):
        hg, hn = hscore(good, labels, shrinkage=shrink), hscore(noise, labels, shrinkage=shrink)
        assert hg > hn + 0.5
        assert 0.0 <= hn and hg <= 2.0 + 1e-9  # <= min(D, K - 1)


def test_hscore_plain_matches_definition():
    rng = np.random.default_rng(9)
    F, labels = _blobs(rng, n=60, d=5, k=3, sep=1.0)
    g = np.stack([F[labels == labels[i]].mean(0) for i in range(len(F))])  # E[f|y] per sample
    ref = np.trace(np.linalg.inv(np.cov(F, rowvar=False)) @ np.cov(g, rowvar=False))
    assert math.isclose(hscore(F, labels, shrinkage=False), ref, rel_tol=1e-9)
    # N < D: still finite (pseudo-inverse / shrinkage)
    assert np.isfinite(hscore(F[:4], labels[:4], shrinkage=False))
    assert np.isfinite(hscore(rng.normal(size=(8, 30)), np.arange(8) % 2))


# --------------------------------------------------------------------------- ranks


def test_kendall_tau_known_values():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert kendall_tau(a, a * 10 + 1) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    # ties: pairs (12) C, (13) C, (14) C, (23) tied in a, (24) D, (34) tied in b
    # n0 = 6, n_c - n_d = 2, n1 = n2 = 1 -> tau_b = 2 / sqrt(5 * 5) = 0.4
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert kendall_tau(torch.tensor([3.0, 1.0, 2.0]), [30, 10, 20]) == pytest.approx(1.0)


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(10)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 6, 40)
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_combine_ranks():
    table = {
        "m1": {"logme": 1.0, "leep": -0.5, "h": 3.0},
        "m2": {"logme": 2.0, "leep": -0.5, "h": float("nan")},
        "m3": {"logme": 0.5, "leep": -1.0, "h": 1.0},
    }
    assert combine_ranks(table, ["logme"]) == {"m1": 2.0, "m2": 1.0, "m3": 3.0}
    # leep: m1, m2 tie for ranks 1-2 -> 1.5 each; h: NaN ranks last
    r = combine_ranks(table, ["logme", "leep", "h"])
    expected = {"m1": (2 + 1.5 + 1) / 3, "m2": (1 + 1.5 + 3) / 3, "m3": (3 + 3 + 2) / 3}
    assert r == pytest.approx(expected)
    with pytest.raises(ValueError):
        combine_ranks(table, ["missing"])
