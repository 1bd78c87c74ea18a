"""The training loss choice (seg.loss, ``dicomnode train --loss``)."""

from __future__ import annotations

import pytest
import torch

from seg.loss import DiceFocal, build_loss

CLASSES = 30


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, class fractions (soft targets) and a label map for a 2 x 8³ batch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, CLASSES, 8, 8, 8, generator=g) * 3
    labels = torch.randint(0, CLASSES, (2, 1, 8, 8, 8), generator=g)
    fractions = torch.softmax(torch.randn(2, CLASSES, 8, 8, 8, generator=g) * 4, dim=1)
    return logits, fractions, labels


def test_dicefocal_at_gamma_zero_is_dicece_in_scale_and_value() -> None:
    """The focal term is summed over classes as cross-entropy is: at gamma 0 both losses agree, for
    class fractions and for label maps, weighted or not (MONAI's DiceFocalLoss would be 30 times
    smaller and sigmoid-based)."""
    from monai.losses import DiceCELoss

    logits, fractions, labels = _case()
    weight = torch.ones(CLASSES)
    weight[7] = 3.0
    for target, one_hot in ((fractions, False), (labels, True)):
        for w in (None, weight if not one_hot else None):  # torch normalises weighted label-map CE
            dicece = DiceCELoss(to_onehot_y=one_hot, softmax=True, batch=True, weight=w)
            focal0 = DiceFocal(one_hot_labels=one_hot, dice_batch=True, weight=w, gamma=0.0)
            assert float(focal0(logits, target)) == pytest.approx(float(dicece(logits, target)), rel=1e-5)


def test_dicefocal_equals_monais_dice_and_softmax_focal_terms() -> None:
    """One shared log-softmax gives the value of MONAI's DiceLoss plus its softmax FocalLoss summed
    over classes (gamma 2), for class fractions and label maps, with class weights."""
    from monai.losses import DiceLoss, FocalLoss

    logits, fractions, labels = _case()
    weight = torch.ones(CLASSES)
    weight[7] = 3.0
    for target, one_hot in ((fractions, False), (labels, True)):
        for w in (None, weight):
            dice = DiceLoss(to_onehot_y=one_hot, softmax=True, batch=True, weight=w)
            focal = FocalLoss(to_onehot_y=one_hot, use_softmax=True, gamma=2.0, weight=w)
            want = float(dice(logits, target) + focal(logits, target) * CLASSES)
            got = DiceFocal(one_hot_labels=one_hot, dice_batch=True, weight=w)(logits, target)
            assert float(got) == pytest.approx(want, rel=1e-5)


def test_dicefocal_lets_hard_voxels_carry_the_gradient() -> None:
    """Against cross-entropy, the focal term all but ignores voxels already right with confidence and
    keeps nearly all of a badly wrong voxel's cost."""
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    right = torch.zeros(1, CLASSES, 4, 4, 4)
    right[:, 0] = 8.0  # p(background) ≈ 0.99
    wrong = torch.zeros(1, CLASSES, 4, 4, 4)
    wrong[:, 5] = 8.0  # p(background) ≈ 3e-4

    def voxel_term(name: str, logits: torch.Tensor) -> float:
        loss = build_loss(name, one_hot_labels=True, dice_batch=True, class_weights={},
                          device=torch.device("cpu"))
        from monai.losses import DiceLoss

        dice_only = DiceLoss(to_onehot_y=True, softmax=True, batch=True)
        return float(loss(logits, labels) - dice_only(logits, labels))

    assert voxel_term("dicefocal", right) < 1e-3 * voxel_term("dicece", right)
    assert voxel_term("dicefocal", wrong) > 0.99 * voxel_term("dicece", wrong)


def test_the_loss_is_chosen_by_config_and_a_misspelt_one_is_refused() -> None:
    """--loss reaches the run with its class weights; dicece stays the default; a misspelt name is
    refused when the run is configured and on the command line, naming the choices."""
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from seg.labels import LABEL_OF
    from seg.recipe import DEMO_UNETR
    from seg.train import TrainConfig, _setup

    arch = {**DEMO_UNETR, "img_size": [16, 16, 16], "hidden_size": 48, "mlp_dim": 96, "num_heads": 2,
            "feature_size": 8}
    focal = _setup(TrainConfig(arch=arch, device="cpu", precision="fp32", loss="dicefocal",
                               class_weights={"femur": 2.0})).loss_fn
    assert isinstance(focal, DiceFocal)
    assert focal.weight[LABEL_OF["femur"]] == 2.0 and focal.dice.class_weight[LABEL_OF["femur"]] == 2.0
    default = TrainConfig(arch=arch, device="cpu", precision="fp32")
    assert default.loss == "dicece" and not isinstance(_setup(default).loss_fn, DiceFocal)
    with pytest.raises(ValueError, match="dicefocal"):
        TrainConfig(loss="focal")
    result = CliRunner().invoke(app, ["train", "--phantoms", "2", "--out", "x", "--loss", "focal"])
    assert result.exit_code == 2 and "dicefocal" in result.output
