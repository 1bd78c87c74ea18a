"""What a model expects of its input (model.json "preprocessing"), apart from the transforms.

Why apart from :mod:`seg.preprocess`: the record is part of the package format, which
:mod:`seg.package` reads and checks without torch; the transforms that apply it need torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer, model_validator

HU_WINDOW = (-57.0, 164.0)
GAMMA = 2.0
ImageResampling = Literal["bilinear", "box"]
IMAGE_RESAMPLING: tuple[ImageResampling, ...] = get_args(ImageResampling)
# "li": linear interpolation across the metal trace (seg.mar), before anything else reads the CT;
# "li+learned": then the package's learned correction of the streak LI leaves (seg.streak_net)
MetalArtefactReduction = Literal["none", "li", "li+learned"]
# what a training run can cache its CTs with: the learned correction comes with a package
# (scripts/train_streak_net.py --package), not with a run
TrainingMetalArtefactReduction = Literal["none", "li"]


class PreprocessConfig(BaseModel):
    """What the model expects; stored in model.json under "preprocessing"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    orientation: str = "RAS"
    hu_window: tuple[float, float] = HU_WINDOW
    gamma: float = GAMMA
    crop_margin_vox: int = 4
    # Foreground = scaled intensity above this (0 after the window = HU above −57: muscle, bone, couch).
    foreground_threshold: float = 0.0
    # "box": the CT's mean over each model voxel's footprint (seg.preprocess says why)
    image_resampling: ImageResampling = "bilinear"
    # Applied first (seg.mar.as_configured): by seg.infer.segment before the model grid and the HU
    # refinement, and by training to every case it caches.
    metal_artefact_reduction: MetalArtefactReduction = "none"

    @model_validator(mode="before")
    @classmethod
    def _drop_foreground_crop(cls, data: Any) -> Any:
        """Every model.json says ``"foreground_crop": true``, but the crop is not optional
        (:func:`spatial_transforms` always crops): the key is read and dropped, whatever it says."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k != "foreground_crop"}
        return data

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The record as model.json and the training cache's preprocessing.json have always had it:
        ``foreground_crop`` still written (before ``image_resampling``), and
        ``metal_artefact_reduction`` only when not "none", so a re-exported package and an existing
        cache record read and compare the same as before."""
        d = handler(self)
        resampling = d.pop("image_resampling")
        mar = d.pop("metal_artefact_reduction")
        return d | {"foreground_crop": True, "image_resampling": resampling} | (
            {} if mar == "none" else {"metal_artefact_reduction": mar})
