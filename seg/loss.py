"""The training loss: soft Dice plus a voxel-wise term, with optional per-class weights.

``dicece`` is MONAI's :class:`~monai.losses.DiceCELoss` (the recipe of every shipped leg).
``dicefocal`` keeps the same Dice and replaces cross-entropy by the softmax focal loss (gamma 2),
which down-weights voxels the network already gets right, so the hard ones (boundaries where an
implant's streaks cross small hip muscles) carry more of the gradient. MONAI's own
:class:`~monai.losses.DiceFocalLoss` is not used: its focal term is the sigmoid one (each class on
its own, not the softmax the Dice term and inference use) and is averaged over classes, 30 times
smaller than cross-entropy. Here the focal term is summed over classes as cross-entropy is, so at
gamma 0 the two losses are equal and switching only changes which voxels count, not the scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from seg import labels as L
from seg.recipe import Loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> loss
FOCAL_GAMMA = 2.0


def loss_class_weights(named: dict[str, float]) -> torch.Tensor | None:
    """One weight per class in label order (None: all 1); an unknown class name or a weight that
    is not a positive finite number raises ValueError."""
    for name, w in named.items():
        if name not in L.LABEL_OF:
            near = L.closest_name(name)
            raise ValueError(f"unknown class {name!r}" + (f" (did you mean {near!r}?)" if near else ""))
        if not (w > 0 and np.isfinite(w)):
            raise ValueError(f"the loss weight of {name} must be positive and finite, not {w}")
    if not named:
        return None
    weights = torch.ones(L.NUM_CLASSES)
    for name, w in named.items():
        weights[L.LABEL_OF[name]] = w
    return weights


class DiceFocal(torch.nn.Module):
    """Soft Dice (softmax) + softmax focal loss summed over classes, averaged over voxels.

    One log-softmax serves both terms (MONAI's DiceLoss and FocalLoss would each take their own
    softmax of the logits, and FocalLoss one-hot encodes the labels again); the value equals theirs
    (``tests/test_loss.py``)."""

    def __init__(self, *, one_hot_labels: bool, dice_batch: bool, weight: torch.Tensor | None,
                 gamma: float = FOCAL_GAMMA) -> None:
        from monai.losses import DiceLoss

        super().__init__()
        self.dice = DiceLoss(include_background=True, batch=dice_batch, weight=weight)  # on probabilities
        self.one_hot_labels, self.gamma, self.weight = one_hot_labels, gamma, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from monai.networks.utils import one_hot

        log_p = torch.log_softmax(logits.float(), 1)
        p = log_p.exp()
        if self.one_hot_labels:
            target = one_hot(target, num_classes=logits.shape[1])
        target = target.float()
        per_class = (1.0 - p).pow(self.gamma) * log_p * target
        if self.weight is not None:
            per_class = per_class * self.weight.view(1, -1, *[1] * (logits.ndim - 2))
        return self.dice(p, target) - per_class.sum(1).mean()


def build_loss(name: Loss, *, one_hot_labels: bool, dice_batch: bool,
               class_weights: dict[str, float], device: torch.device) -> LossFn:
    """The configured loss; ``one_hot_labels`` when targets are label maps, not class fractions."""
    from monai.losses import DiceCELoss

    weight = loss_class_weights(class_weights)
    weight = None if weight is None else weight.to(device)
    if name == "dicefocal":
        return DiceFocal(one_hot_labels=one_hot_labels, dice_batch=dice_batch, weight=weight)
    return DiceCELoss(to_onehot_y=one_hot_labels, softmax=True, include_background=True,
                      batch=dice_batch, weight=weight)
