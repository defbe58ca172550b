"""Retrieval for selective joint fine-tuning: filter banks, adaptive histograms, eq. (1) K-NN,
the hard-sample schedule (eq. 2-3) and the descriptor cache."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autotl.retrieval import (
    HardSampleSchedule,
    describe_folder,
    filter_weights,
    fit_bin_edges,
    gabor_bank,
    gabor_filter_bank,
    gabor_params,
    histograms,
    knn,
    pairwise_symmetric_kl,
    prediction_entropy,
    responses_to_histograms,
    retrieve,
    selected_pool_indices,
    source_conv_bank,
    source_filter_bank,
)


def random_hists(n, F_=5, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, F_, B, generator=g) ** 3 + 1e-3
    return x / x.sum(-1, keepdim=True)


def brute_force(P, Q, w=None):
    """Eq. (1) by an explicit double loop in float64."""
    n, Fn, _ = P.shape
    w = torch.ones(Fn, dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
    D = torch.zeros(n, Q.shape[0], dtype=torch.float64)
    for i in range(n):
        for j in range(Q.shape[0]):
            p, q = P[i].double(), Q[j].double()
            kl_pq = (p * (p / q).log()).sum(-1)
            kl_qp = (q * (q / p).log()).sum(-1)
            D[i, j] = (w * (kl_pq + kl_qp)).sum()
    return D


def smooth_noise_images(n, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * x + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------ distance and K-NN


def test_symmetric_kl_properties():
    P, Q = random_hists(6, seed=1), random_hists(9, seed=2)
    w = torch.rand(5, generator=torch.Generator().manual_seed(3))
    D = pairwise_symmetric_kl(P, Q, w)
    assert D.shape == (6, 9)
    assert torch.allclose(D.double(), brute_force(P, Q, w), atol=1e-5, rtol=1e-5)
    assert torch.allclose(D, pairwise_symmetric_kl(Q, P, w).T, atol=1e-5)  # symmetric
    assert (D >= 0).all()
    self_d = pairwise_symmetric_kl(P, P, w)
    assert self_d.diagonal().abs().max() < 1e-5  # zero on identical histograms
    assert (self_d + torch.eye(6) >= 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000])
def test_knn_matches_brute_force(chunk_size):
    P, Q = random_hists(7, seed=4), random_hists(40, seed=5)
    Q[25], Q[33] = Q[2], Q[2]  # exact ties, in different chunks for most chunk sizes
    w = filter_weights([2, 3])
    k = 10  # > several chunk sizes
    res = knn(P, Q, k, weights=w, chunk_size=chunk_size)
    D = brute_force(P, Q, w)
    ref_d, ref_i = D.sort(dim=1, stable=True)  # stable: ties ordered by index
    assert res.indices.dtype == torch.int64 and res.distances.dtype == torch.float32
    assert torch.equal(res.indices, ref_i[:, :k])
    assert torch.allclose(res.distances.double(), ref_d[:, :k], atol=1e-5, rtol=1e-5)
    # a query equal to the duplicated pool rows gets them first, lowest index first
    r = knn(Q[2:3], Q, 3, weights=w, chunk_size=chunk_size)
    assert r.indices.tolist() == [[2, 25, 33]]
    assert r.distances.abs().max() < 1e-5


def test_knn_edge_cases():
    P, Q = random_hists(4), random_hists(6)
    r = knn(P, Q, 0)
    assert r.distances.shape == (4, 0) and r.indices.shape == (4, 0)
    assert knn(P, Q, 6).indices.shape == (4, 6)
    with pytest.raises(ValueError):
        knn(P, Q, 7)


def test_retrieve_weights_each_bank_by_its_size():
    qa, pa = random_hists(3, F_=2, seed=6), random_hists(12, F_=2, seed=7)
    qb, pb = random_hists(3, F_=6, seed=8), random_hists(12, F_=6, seed=9)
    res = retrieve([qa, qb], [pa, pb], 5)
    D = brute_force(qa, pa) / 2 + brute_force(qb, pb) / 6  # w_h = 1 / N_h
    ref_d, ref_i = D.sort(dim=1, stable=True)
    assert torch.equal(res.indices, ref_i[:, :5])
    assert torch.allclose(res.distances.double(), ref_d[:, :5], atol=1e-5)


# ------------------------------------------------------------------ filter banks


def test_gabor_bank_scales_and_orientations():
    kernels = gabor_bank()
    params = gabor_params()
    assert kernels.shape[:2] == (48, 1) and kernels.shape[-1] % 2 == 1
    assert len(params) == 24
    assert [p.frequency for p in params[::6]] == pytest.approx([0.4, 0.2, 0.1, 0.05])
    assert kernels.sum(dim=(1, 2, 3)).abs().max() < 1e-4  # zero-mean
    n = 256
    f = torch.fft.fftfreq(n)

    def peak(kernel):
        iy, ix = divmod(int(torch.fft.fft2(kernel, s=(n, n)).abs().argmax()), n)
        return float(f[ix]), float(f[iy])  # (fx, fy): x = column, y = row

    def angle_error(fx, fy, theta):
        d = abs(math.atan2(fy, fx) - theta) % math.pi
        return min(d, math.pi - d)

    measured = []
    for j, p in enumerate(params):
        # the complex filter (real + i imag) has a one-sided spectrum centred on f (cos t, sin t)
        fx, fy = peak(torch.complex(kernels[j, 0], kernels[24 + j, 0]))
        assert angle_error(fx, fy, p.theta) < math.radians(6), (j, fx, fy, p.theta)
        assert math.hypot(fx, fy) == pytest.approx(p.frequency, rel=0.1), j
        measured.append(math.hypot(fx, fy))
        # each real kernel on its own (two-sided spectrum) has the same dominant orientation
        for c in (j, 24 + j):
            assert angle_error(*peak(kernels[c, 0]), p.theta) < math.radians(8), c
    by_scale = [sum(measured[m * 6 : (m + 1) * 6]) / 6 for m in range(4)]
    assert all(a > 1.7 * b for a, b in zip(by_scale, by_scale[1:]))  # an octave apart


def test_gabor_responses_are_the_convolution():
    bank1, bank2 = gabor_filter_bank(stride=1), gabor_filter_bank(stride=2)
    x = torch.rand(2, 3, 50, 43, generator=torch.Generator().manual_seed(0))
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    p = bank1.ksize // 2
    ref = F.conv2d(F.pad(grey, (p, p, p, p), mode="replicate" if p >= 43 else "reflect"), bank1.kernels)
    r1 = bank1.responses(x)
    assert r1.shape == (2, 48, 50, 43)
    assert (r1 - ref).abs().max() < 1e-4 * ref.abs().max()
    r2 = bank2.responses(x)
    assert r2.shape == (2, 48, 25, 22)
    rel = (r2 - ref[..., ::2, ::2]).abs().amax(dim=(0, 2, 3)) / ref.std(dim=(0, 2, 3))
    assert rel.max() < 1e-2


def test_source_conv_bank_reproduces_first_stages():
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    seen = {}
    model.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("stage1", o.clone()))
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("stage2", o.clone()))
    x = torch.rand(2, 3, 40, 40)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        model((x - mean) / std)
    bank = source_filter_bank(model, stages=2)
    n1 = model.conv_stem.out_channels
    assert bank.groups == (n1, seen["stage2"].shape[1])
    r = bank.responses(x)
    torch.testing.assert_close(r[:, :n1], seen["stage1"])
    torch.testing.assert_close(r[:, n1:], seen["stage2"])
    assert any(isinstance(m, torch.nn.SiLU) for m in bank.module.modules())  # with the non-linearity
    assert torch.allclose(bank.filter_weights()[:n1], torch.tensor(1.0 / n1))
    # a frozen copy: the model's later training does not change the bank or its key
    key = bank.key
    with torch.no_grad():
        model.conv_stem.weight.add_(1.0)
    assert bank.key == key
    assert source_filter_bank(model).key != source_filter_bank(timm.create_model("test_efficientnet")).key
    mod = source_conv_bank(model)
    assert not mod.training and not any(p.requires_grad for p in mod.parameters())

    resnet = timm.create_model("resnet10t", pretrained=False).eval()
    got = {}
    resnet.act1.register_forward_hook(lambda m, i, o: got.__setitem__("a", o.clone()))
    with torch.no_grad():
        resnet(x)
        torch.testing.assert_close(source_conv_bank(resnet)(x), got["a"])


def test_first_convs_bank_is_the_first_two_convolutions_after_their_activation():
    """The paper's best bank: each response taken after the non-linearity of its convolution."""
    import timm

    from autotl.retrieval.filterbanks import FirstConvsFilterBank, create_filter_bank
    from autotl.retrieval.neighbours import BANKS, create_banks

    # random weights, EfficientNet-Lite layout: blocks[0] is a depthwise-separable block that ends
    # in a linear 1x1 projection
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.rand(2, 3, 40, 40)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    b0 = model.blocks[0][0]
    with torch.no_grad():
        stem = model.bn1(model.conv_stem((x - mean) / std))  # BatchNormAct2d: BN + activation
        second = b0.bn1(b0.conv_dw(stem))
        linear_end = model.blocks[0](stem)  # what the "conv" bank takes: ends in a linear projection
    bank = create_filter_bank("firstconvs", model)
    assert isinstance(bank, FirstConvsFilterBank) and "firstconvs" in BANKS and "gabor+firstconvs" in BANKS
    assert bank.groups == (stem.shape[1], second.shape[1])
    assert bank.module.layer_names == ("bn1.act", "blocks.0.0.bn1.act")
    r = bank.responses(x)
    n1 = stem.shape[1]
    torch.testing.assert_close(r[:, :n1], stem)
    torch.testing.assert_close(r[:, n1:], second)
    assert bool((linear_end < 0).any()) and not bool((second < -1e-6).any())  # after ReLU6, not the projection
    assert "first 2 convolutions" in bank.describe() and "blocks[0]" in create_banks("conv", model)[0].describe()
    # the model is left as it was (no hooks), and the key follows the weights the responses use only
    assert not any(m._forward_hooks for m in model.modules())
    key = bank.key
    other = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.classifier.weight.add_(1.0)
    assert FirstConvsFilterBank(other).key == key
    with torch.no_grad():
        other.blocks[0][0].conv_dw.weight.add_(1.0)
    assert FirstConvsFilterBank(other).key != key

    resnet = timm.create_model("resnet10t", pretrained=False).eval()  # deep stem: conv-BN-ReLU twice first
    with torch.no_grad():
        xr = (x - torch.tensor(resnet.pretrained_cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(resnet.pretrained_cfg["std"]).view(1, 3, 1, 1)
        a1 = resnet.conv1[2](resnet.conv1[1](resnet.conv1[0](xr)))
        a2 = resnet.conv1[5](resnet.conv1[4](resnet.conv1[3](a1)))
    rb = FirstConvsFilterBank(resnet)
    torch.testing.assert_close(rb.responses(x), torch.cat([a1, a2], 1))


# ------------------------------------------------------------------ histograms and cache


def test_equal_mass_bins_make_target_histograms_uniform():
    bank = gabor_filter_bank()
    images = smooth_noise_images(12, size=48)
    edges = fit_bin_edges(bank, images, n_bins=16, samples_per_image=10_000, max_samples_per_filter=10**6)
    assert edges.shape == (48, 15)
    assert (edges[:, 1:] >= edges[:, :-1]).all()
    h = histograms(bank, images, edges, eps=0.0)
    assert h.shape == (12, 48, 16)
    assert torch.allclose(h.sum(-1), torch.ones(12, 48))
    pooled = h.mean(0)  # every image contributes the same number of pixels
    assert (pooled - 1 / 16).abs().max() < 0.1 / 16
    # deterministic, and subsampled fitting is close to the exact quantiles
    kw = dict(n_bins=16, samples_per_image=256, max_samples_per_filter=2000)
    sub = fit_bin_edges(bank, list(images.split(5)), **kw)
    assert torch.equal(sub, fit_bin_edges(bank, list(images.split(5)), **kw))
    pooled_sub = histograms(bank, images, sub, eps=0.0).mean(0)
    assert (pooled_sub - 1 / 16).abs().max() < 0.5 / 16


def test_histograms_clip_out_of_range_and_smooth():
    edges = torch.tensor([[0.0, 1.0, 2.0]])
    r = torch.tensor([-5.0, 0.5, 0.5, 1.5, 99.0, 2.0]).view(1, 1, 2, 3)
    h = responses_to_histograms(r, edges, eps=0.0)
    assert h.view(-1).tolist() == pytest.approx([1 / 6, 2 / 6, 2 / 6, 1 / 6])  # (-inf,0] (0,1] (1,2] (2,inf)
    hs = responses_to_histograms(r, edges, eps=1e-3)
    assert (hs > 0).all() and float(hs.sum()) == pytest.approx(1.0)


def test_describe_folder_cache(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "imgs", classes={"a": 3, "b": 3}, size=(40, 30), ext=".jpg")
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    bank = gabor_filter_bank()
    edges = fit_bin_edges(bank, paths, n_bins=8, image_size=32)
    cache = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=4, cache_dir=cache, show_progress=False)
    first, hit1 = describe_folder(bank, paths, edges, **kw)
    assert not hit1 and first.shape == (6, 48, 8)
    assert len(list(cache.glob("hist-*.pt"))) == 1
    second, hit2 = describe_folder(bank, paths, edges, **kw)
    assert hit2 and torch.equal(first, second)
    # order of the paths does not matter for the cache; rows follow the caller's order
    rev, hit3 = describe_folder(bank, paths[::-1], edges, **kw)
    assert hit3 and torch.equal(rev, first.flip(0))
    # matches the in-memory computation
    from autotl.retrieval import load_images

    assert torch.allclose(first, histograms(bank, load_images(paths, 32), edges), atol=1e-6)
    # touching a file invalidates the cache
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third, hit4 = describe_folder(bank, paths, edges, **kw)
    assert not hit4 and torch.equal(third, first)
    # so do other edges / another bank
    assert not describe_folder(bank, paths, edges + 1e-3, **kw).cache_hit
    assert not describe_folder(gabor_filter_bank(stride=1), paths, edges, **kw).cache_hit


# ------------------------------------------------------------------ hard-sample schedule


def test_hard_sample_schedule_follows_eq3():
    s = HardSampleSchedule(k0=10)
    assert (s.sigma0, s.sigma1, s.delta, s.max_rounds) == (40, 20, 0.1, 5)
    probs = torch.tensor(
        [
            [0.90, 0.10],  # wrong (label 1)                          -> +sigma0
            [0.95, 0.05],  # right, H = 0.199 nats >= 0.1             -> +sigma1
            [0.999, 0.001],  # right, H = 0.008                       -> unchanged
            [0.98, 0.02],  # right, H = 0.098 nats (0.141 bits)       -> unchanged (natural log)
            [0.30, 0.70],  # right, H = 0.611                         -> +sigma1
        ]
    )
    labels = torch.tensor([1, 0, 0, 0, 1])
    assert prediction_entropy(probs)[3] == pytest.approx(-(0.98 * math.log(0.98) + 0.02 * math.log(0.02)), abs=1e-6)
    counts = s.initial_counts(5)
    assert counts.tolist() == [10] * 5
    new = s.next_counts(probs, labels, counts, round_idx=0)
    assert new.tolist() == [50, 30, 10, 10, 30]
    again = s.next_counts(probs, labels, new, round_idx=1)
    assert again.tolist() == [90, 50, 10, 10, 50]
    # un-normalised entropy: with many classes a flat-ish prediction stays uncertain
    many = torch.full((1, 100), 0.001)
    many[0, 0] = 1 - 0.099
    assert s.next_counts(many, torch.tensor([0]), torch.tensor([10]), 0).tolist() == [30]
    assert s.max_count == 10 + 4 * 40
    assert s.has_next(3) and not s.has_next(4)
    with pytest.raises(ValueError):
        s.next_counts(probs, labels, counts, round_idx=4)
    with pytest.raises(ValueError):
        s.next_counts(torch.tensor([[3.0, -1.0]]), torch.tensor([0]), torch.tensor([10]), 0)  # logits


def test_selected_pool_indices():
    idx = torch.tensor([[5, 1, 7, 2], [1, 3, 9, 8]])
    assert selected_pool_indices(idx, torch.tensor([2, 1])).tolist() == [1, 5]
    assert selected_pool_indices(idx, torch.tensor([4, 3])).tolist() == [1, 2, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        selected_pool_indices(idx, torch.tensor([5, 1]))


def test_schedule_with_knn_end_to_end():
    """K-NN for max_count once, then each round's source subset by slicing."""
    s = HardSampleSchedule(k0=1, max_rounds=3)
    P, Q = random_hists(4, seed=11), random_hists(30, seed=12)
    res = knn(P, Q, s.max_count)
    counts = s.initial_counts(4)
    first = selected_pool_indices(res.indices, counts)
    assert set(first.tolist()) == set(res.indices[:, 0].tolist())
    probs = torch.tensor([[0.1, 0.9]] * 4)
    counts = s.next_counts(probs, torch.tensor([0, 1, 1, 1]), counts, 0)
    assert counts.tolist() == [5, 3, 3, 3]
    assert len(selected_pool_indices(res.indices, counts)) >= len(first)


def test_public_api_arrays_accept_numpy():
    P, Q = random_hists(3), random_hists(8)
    r = knn(P.numpy(), Q.numpy(), 2)
    assert torch.equal(r.indices, knn(P, Q, 2).indices)
    assert np.allclose(pairwise_symmetric_kl(P.numpy(), Q.numpy()).numpy(), pairwise_symmetric_kl(P, Q).numpy())
