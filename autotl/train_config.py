"""``TrainConfig``: the settings of one training run, torch-free so that option checks, recipes and
regularisers can read them without importing the training loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OBJECTIVES = ("accuracy", "macro_f1")


@dataclass
class TrainConfig:
    """Training settings of one run: what is frozen, optimiser, schedule, regulariser (the search varies these)."""

    frozen_stages: int | str = "all"
    epochs: int = 15
    lr: float = 3e-3  # head learning rate; the pretrained stages get lr * backbone_lr_ratio
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 64
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: mixup of the trainable part's inputs, mixing weight ~ Beta(α, α)
    rand_augment: int = 0  # > 0: RandAugment of this magnitude on decoded training images (no prefix cache)
    patience: int = 5
    early_stopping: bool = True  # False: train all epochs, keep the last (a refit for a chosen epoch count)
    # stop after this many epochs of the ``epochs``-long schedule (a refit follows the schedule its trial
    # used and stops where the trial's folds chose); None: run the schedule to its end
    stop_epoch: int | None = None
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    objective: str = "accuracy"
    seed: int = 0
    use_cache: str | bool = "auto"  # True | False | "auto" (cache when it fits in memory)
    # regularisation (see autotl.regularizers)
    regularizer: str = "none"  # "none" | "l2sp" | "kd"
    reg_lambda: float = 0.0  # λ: weight of the regulariser
    reg_beta: float = 0.0  # L2-SP β on the new head
    reg_decay: float = 1.0  # λ_e = λ · decay^epoch
    kd_layers: list[str] = field(default_factory=list)
    dtnh: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
