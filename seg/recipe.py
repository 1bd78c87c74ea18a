"""The paper's UNETR and the recipe that trained the shipped demo model (the defaults of
``dicomnode train`` and of :class:`seg.train.TrainConfig`), in one place.

Why a module of its own: the command line shows these defaults in ``--help`` without importing torch,
and a site that runs ``dicomnode train --phantoms N --out DIR`` gets the recipe that is known to learn
(docs/models.md: the 4 mm grid, 48³ ROI and feature size 16 against the older 3 mm, 64³ and 8).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator

from seg import labels as L

# The paper's UNETR (Kim et al. 2024): patch 16, hidden 768, 12 heads, MLP 3072, feature size 16, 96³.
PAPER_UNETR = {
    "in_channels": 1,
    "out_channels": L.NUM_CLASSES,
    "img_size": [96, 96, 96],
    "feature_size": 16,
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_heads": 12,
    "proj_type": "conv",
    "norm_name": "instance",
    "res_block": True,
    "dropout_rate": 0.0,
}
# The shipped demo's UNETR: the paper's family (patch 16, feature size 16), a smaller ViT and ROI, small
# enough to train and run on two CPU cores.
DEMO_UNETR = {**PAPER_UNETR, "img_size": [48, 48, 48], "hidden_size": 192, "mlp_dim": 768, "num_heads": 4}
SPACING_MM = 4.0  # the model grid, isotropic
BATCH_SIZE = 4  # crops per step
LR = 1e-3  # AdamW peak learning rate from scratch (the campaign's later legs, warm-started, used less)
# Training choices (seg.train.TrainConfig, ``dicomnode train``): crop centres, targets.
Crop = Literal["foreground", "classes"]
Targets = Literal["partial_volume", "nearest"]
Loss = Literal["dicece", "dicefocal"]  # seg.loss
# Shares of post-operative training phantoms a plan can have (seg.train.phantom_plan: a post-operative
# place in every four, or two, or three)
POSTOP_SHARES = (0.25, 0.5, 0.75)
POSTOP_SHARES_TEXT = ", ".join(f"{v:g}" for v in POSTOP_SHARES[:-1]) + f" or {POSTOP_SHARES[-1]:g}"
# The volume share an atrophied muscle of a post-operative phantom keeps is drawn from
# [ATROPHY_KEPT_MIN, ATROPHY_KEPT_MAX) (seg.train.phantom_options); the held-out and validation plans
# always use these, a training plan may reach lower (TrainConfig.atrophy_kept_min).
ATROPHY_KEPT_MIN, ATROPHY_KEPT_MAX = 0.6, 0.95


# Numeric training settings are checked when a run is configured (seg.train.TrainConfig), so that a
# negative learning rate, a share of 1.5 or a batch of 0 is a usage error, not a silent or late failure.
def _postop_share(value: float) -> float:
    if value not in POSTOP_SHARES:
        raise ValueError(f"must be {POSTOP_SHARES_TEXT}")
    return value


def _share(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _atrophy_kept(value: float) -> float:
    if not 0.0 < value <= ATROPHY_KEPT_MIN:
        raise ValueError(f"must be above 0 and at most {ATROPHY_KEPT_MIN:g} (the held-out plan's)")
    return value


def _positive(value: float) -> float:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError("must be positive and finite")
    return value


def _not_negative(value: float) -> float:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError("must be zero or more")
    return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


PostopShare = Annotated[float, AfterValidator(_postop_share)]
AtrophyKept = Annotated[float, AfterValidator(_atrophy_kept)]
Share = Annotated[float, AfterValidator(_share)]  # a probability, or a fraction of the run
Positive = Annotated[float, AfterValidator(_positive)]
NotNegative = Annotated[float, AfterValidator(_not_negative)]
Count = Annotated[int, AfterValidator(_at_least_one)]
NotNegativeCount = Annotated[int, AfterValidator(_not_negative)]


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(value: str) -> str:
    """A torch device to train or run on (auto, cpu, cuda, cuda:N): checked where it is given, so a
    typo fails at start-up, not at the first job or step."""
    if not _DEVICE.fullmatch(value):
        raise ValueError("must be auto, cpu, cuda or cuda:N (N = GPU index)")
    return value


Device = Annotated[str, AfterValidator(check_device)]


# Inference and training precision choices; on the CPU the environment picks one for inference.
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Who computes the windows (seg.runtime): auto = OpenVINO on the CPU when installed, else PyTorch.
Runtime = Literal["auto", "torch", "openvino"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
CPU_PRECISION_ENV = "DICOMNODE_CPU_PRECISION"


def cpu_precision(environ: Mapping[str, str] | None = None) -> str:
    """``DICOMNODE_CPU_PRECISION`` ("auto" when unset), or ValueError: a typo ("bf61") silently meant
    fp32 to PyTorch and was refused only by the OpenVINO runtime, in each job."""
    value = (os.environ if environ is None else environ).get(CPU_PRECISION_ENV, "auto")
    if value not in PRECISIONS:
        raise ValueError(f"{CPU_PRECISION_ENV} {value!r} is not one of {', '.join(PRECISIONS)}")
    return value
