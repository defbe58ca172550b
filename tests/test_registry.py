"""One registry shape for strategies, regularisers and filter banks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from autotl._registry import DEFAULT_ORDER, Registry, UnknownNameError
from autotl.data import DatasetIndex, Sample
from autotl.errors import AutotlError
from autotl.regularizers import (
    REGULARIZERS,
    BaseRegularizer,
    NoRegularizer,
    create_regularizer,
    list_regularizers,
)
from autotl.retrieval.filterbanks import (
    FILTER_BANKS,
    BaseFilterBank,
    GaborFilterBank,
    create_filter_bank,
    list_filter_banks,
)
from autotl.retrieval.neighbours import BANKS, create_banks
from autotl.stages import SuffixView, TransferNet
from autotl.strategy import (
    STRATEGIES,
    BaseStrategy,
    StrategyContext,
    apply_strategies,
    create_strategies,
    create_strategy,
    list_strategies,
    strategy_params,
)
from autotl.train import TrainConfig, _make_regularizer, _optimizer


# ----------------------------------------------------------------------------- members for the tests
class _KeepEverySecond(BaseStrategy):
    """Keeps every second training sample and records the order it ran in."""

    name = "every-second"
    params = ("every_second",)

    def is_active(self, params):
        return bool(params.get("every_second"))

    def apply(self, ctx, params):
        ctx.train_samples = ctx.train_samples[::2]
        ctx.notes.setdefault("ran", []).append(self.name)


class _RecordFirst(_KeepEverySecond):
    name = "record-first"

    def apply(self, ctx, params):
        ctx.notes.setdefault("ran", []).append(self.name)


class _HeadNorm(BaseRegularizer):
    """Ω = ‖ω_new‖²/2 scaled by ``config.reg_beta``: only the new head is pulled to zero."""

    name = "head-norm"
    shares_graph = False

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    @classmethod
    def from_config(cls, config, model):
        return cls(scale=config.reg_beta)

    def penalty(self, state):
        return 0.5 * self.scale * sum((p * p).sum() for _, p in self.new_params)


class _LumaBank(BaseFilterBank):
    """One filter: the greyscale image itself."""

    name = "luma"
    groups = (1,)

    @classmethod
    def from_source(cls, source_model):
        return cls()

    def responses(self, images):
        return torch.as_tensor(images, dtype=torch.float32).mean(1, keepdim=True)

    def _key_material(self):
        return [b"mean-of-rgb"]


@pytest.fixture
def registered():
    """Register ``(registry, name, target, order)`` tuples for one test, and remove them after it."""
    added = []

    def register(registry, name, target, order=DEFAULT_ORDER):
        registry.register(name, target, order=order)
        added.append((registry, name))

    yield register
    for registry, name in added:
        registry.unregister(name)


def _view(frozen: int = 2):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    net = TransferNet.from_source(model, 3, frozen=frozen)
    return SuffixView(net, frozen)


# ----------------------------------------------------------------------------- abstract bases
@pytest.mark.parametrize("base, methods", [
    (BaseStrategy, {"is_active", "apply"}),
    (BaseRegularizer, {"from_config", "penalty"}),
    (BaseFilterBank, {"from_source", "responses", "_key_material"}),
])
def test_a_base_cannot_be_instantiated_without_its_abstract_methods(base, methods):
    assert base.__abstractmethods__ == methods
    with pytest.raises(TypeError, match="abstract"):
        base()
    for missing in methods:  # a subclass that leaves out any one of them is still abstract
        partial = type("Partial", (base,), {m: lambda *a, **k: None for m in methods - {missing}})
        with pytest.raises(TypeError, match=missing):
            partial()
    complete = type("Complete", (base,), {m: lambda *a, **k: None for m in methods})
    assert isinstance(complete(), base)


# ----------------------------------------------------------------------------- explicit order
def test_each_registry_lists_its_members_in_explicit_order():
    # dropout before retrieval: retrieval works on the samples dropout keeps
    assert list_strategies() == ["features", "dropout", "retrieval", "lpft"] == [s.name for s in create_strategies()]
    assert list_regularizers() == ["none", "l2sp", "kd"]
    assert list_filter_banks() == ["gabor", "conv", "firstconvs"]
    assert tuple(BANKS) == ("gabor", "conv", "firstconvs", "gabor+conv", "gabor+firstconvs", "conv+firstconvs", "gabor+conv+firstconvs")
    assert "gabor+conv" in BANKS and "conv+gabor" not in BANKS and "gabor+gabor" not in BANKS


def test_order_is_the_given_order_not_registration_order():
    registry = Registry("strategy", BaseStrategy)
    registry.register("late", _KeepEverySecond, order=30)
    registry.register("unordered", _KeepEverySecond)  # DEFAULT_ORDER: after the built-ins
    registry.register("early", _KeepEverySecond, order=10)
    registry.register("also-early", _KeepEverySecond, order=10)  # ties: by name
    assert registry.names() == ["also-early", "early", "late", "unordered"]
    registry["late"] = _RecordFirst  # replacing a target keeps its order
    assert registry.names() == ["also-early", "early", "late", "unordered"] and registry["late"] is _RecordFirst


def test_strategies_are_applied_in_registry_order(registered, tmp_path):
    registered(STRATEGIES, "every-second", _KeepEverySecond, order=30)
    registered(STRATEGIES, "record-first", _RecordFirst, order=5)
    assert list_strategies() == ["features", "record-first", "dropout", "retrieval", "every-second", "lpft"]
    samples = [Sample(Path(f"{i}.png"), i % 2) for i in range(6)]
    index = DatasetIndex(root=tmp_path, classes=["a", "b"], train=samples, val=samples[:2], test=[], skipped=[],
                         split="folders")
    # no source model or extractor: these strategies only read the training samples
    ctx = StrategyContext(index=index, source=None, extractor=None, run_dir=tmp_path, config=TrainConfig(),
                          train_samples=list(samples), candidates=["m"])
    apply_strategies(ctx, {"every_second": 1})  # dropout and retrieval stay off
    assert ctx.notes["ran"] == ["record-first", "every-second"]
    assert ctx.train_samples == samples[::2]


# ----------------------------------------------------------------------------- unknown names
def test_an_unknown_name_is_a_clear_error_listing_the_known_names():
    for create, known in [
        (create_strategy, "features, dropout, retrieval, lpft"),
        (lambda n: create_strategies([n]), "features, dropout, retrieval, lpft"),
        (create_regularizer, "none, l2sp, kd"),
        (create_filter_bank, "gabor, conv, firstconvs"),
    ]:
        with pytest.raises(UnknownNameError, match=f"unknown .*'sobel'; available: {known}$"):
            create("sobel")
    assert issubclass(UnknownNameError, ValueError)  # what callers caught before the registries
    with pytest.raises(ValueError, match="unknown regularizer 'sobel'; available: none, l2sp, kd"):
        _make_regularizer(TrainConfig(regularizer="sobel", reg_lambda=0.1), _view())
    with pytest.raises(AutotlError, match="retrieval_bank 'sobel': use one of gabor, conv, firstconvs, gabor\\+conv,"):
        create_banks("sobel")


def test_registering_checks_names_and_targets(registered):
    with pytest.raises(ValueError, match="already registered"):
        STRATEGIES.register("dropout", _KeepEverySecond, order=1)
    with pytest.raises(ValueError, match="lowercase"):
        FILTER_BANKS.register("luma+grey", _LumaBank)  # "+" joins banks in retrieval_bank
    with pytest.raises(TypeError, match="not a BaseRegularizer subclass"):
        REGULARIZERS.register("gabor", GaborFilterBank)
    with pytest.raises(ValueError, match="module:Class"):
        REGULARIZERS.register("nowhere", "autotl.regularizers.l2sp")
    # a path is only imported when the member is used, and must name a subclass of the base
    registered(REGULARIZERS, "wrong-kind", "autotl.retrieval.filterbanks:GaborFilterBank")
    with pytest.raises(TypeError, match="not a BaseRegularizer subclass"):
        create_regularizer("wrong-kind")
    assert list_regularizers() == ["none", "l2sp", "kd", "wrong-kind"]


# ----------------------------------------------------------------------------- adding a member
def test_a_registered_strategy_is_created_like_the_built_ins(registered):
    registered(STRATEGIES, "every-second", f"{__name__}:_KeepEverySecond", order=15)
    assert isinstance(create_strategy("every-second"), _KeepEverySecond)
    assert [type(s) for s in create_strategies(["retrieval", "every-second"])][0] is _KeepEverySecond
    assert "every-second" in list_strategies() and "every_second" in strategy_params()


def test_an_unregistered_member_is_gone_from_every_listing():
    STRATEGIES.register("every-second", _KeepEverySecond, order=15)
    REGULARIZERS.register("head-norm", _HeadNorm, order=40)
    FILTER_BANKS.register("luma", _LumaBank, order=30)
    assert "every_second" in strategy_params() and "head-norm" in list_regularizers() and "gabor+luma" in BANKS
    STRATEGIES.unregister("every-second")
    REGULARIZERS.unregister("head-norm")
    FILTER_BANKS.unregister("luma")
    assert list_strategies() == ["features", "dropout", "retrieval", "lpft"] and "every_second" not in strategy_params()
    assert list_regularizers() == ["none", "l2sp", "kd"] and tuple(BANKS) == ("gabor", "conv", "firstconvs", "gabor+conv", "gabor+firstconvs", "conv+firstconvs", "gabor+conv+firstconvs")
    with pytest.raises(UnknownNameError):
        create_regularizer("head-norm")


def test_a_registered_regularizer_reaches_training_through_make_regularizer(registered):
    registered(REGULARIZERS, "head-norm", _HeadNorm, order=40)
    assert isinstance(create_regularizer("Head-Norm", scale=2.0), _HeadNorm)
    view = _view()
    reg = _make_regularizer(TrainConfig(regularizer="head-norm", reg_lambda=0.1, reg_beta=0.25), view)
    assert isinstance(reg, _HeadNorm) and reg.scale == 0.25 and reg.model is view
    head = {id(p) for _, p in view.net.new_parameters()}
    assert {id(p) for _, p in reg.new_params} == head and all(n.startswith("net.") for n, _ in reg.new_params)
    expected = 0.5 * 0.25 * sum(float((p.detach() ** 2).sum()) for _, p in view.net.new_parameters())
    assert float(reg.penalty(None).detach()) == pytest.approx(expected)


def test_a_registered_filter_bank_is_a_retrieval_bank_choice(registered):
    registered(FILTER_BANKS, "luma", _LumaBank, order=40)
    assert list_filter_banks() == ["gabor", "conv", "firstconvs", "luma"] and len(BANKS) == 15
    assert tuple(BANKS)[:8] == ("gabor", "conv", "firstconvs", "luma", "gabor+conv", "gabor+firstconvs", "gabor+luma",
                                "conv+firstconvs")
    assert isinstance(create_filter_bank("luma"), _LumaBank)
    gabor, luma = create_banks("gabor+luma")
    assert isinstance(gabor, GaborFilterBank) and isinstance(luma, _LumaBank)
    with pytest.raises(AutotlError, match="use one of"):
        create_banks("luma+gabor")  # one spelling per bank set (the registry order)


def test_a_regularizer_that_replaces_weight_decay_turns_it_off_in_the_optimiser(registered):
    class _PullToStart(_HeadNorm):
        name = "pull-to-start"
        replaces_weight_decay = True

    registered(REGULARIZERS, "pull-to-start", _PullToStart, order=40)
    registered(REGULARIZERS, "head-norm", _HeadNorm, order=50)
    net = _view().net

    def decay(name: str, **coefficients) -> set[float]:
        cfg = TrainConfig(regularizer=name, weight_decay=0.05, **coefficients)
        return {group["weight_decay"] for group in _optimizer(net, cfg).param_groups}

    assert decay("pull-to-start", reg_lambda=0.1) == {0.0} and decay("head-norm", reg_lambda=0.1) == {0.05}
    assert decay("l2sp", reg_lambda=0.1) == {0.0} and decay("l2sp") == {0.0}  # whatever its coefficients
    assert decay("kd", reg_lambda=0.1) == decay("none") == {0.05}
    assert decay("L2SP") == {0.05}  # not a registered spelling: training refuses it once it is active (below)


def test_the_regularizer_name_in_a_config_must_be_exact():
    # the optimiser asks the regulariser registered under the name as written whether it replaces
    # weight decay, so "L2SP" in a config would get L2-SP and weight decay; it is refused instead
    with pytest.raises(ValueError, match="write it as 'l2sp'"):
        _make_regularizer(TrainConfig(regularizer="L2SP", reg_lambda=0.1), _view())


# ----------------------------------------------------------------------------- start-up cost
def test_importing_the_registries_does_not_import_the_members():
    code = ("import sys, autotl.strategy, autotl.retrieval.neighbours; "
            "print('autotl.dropout.strategy' in sys.modules, 'autotl.retrieval.strategy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_no_regularizer_from_config_is_plain_fine_tuning():
    assert isinstance(NoRegularizer.from_config(TrainConfig(), None), NoRegularizer)
    assert _make_regularizer(TrainConfig(regularizer="none", reg_lambda=1.0), _view()) is None
