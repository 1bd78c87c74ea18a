"""The projector and its FBP: a reconstruction gives back the slice, a line through one ray stays a line."""

import numpy as np
import torch

from seg.tomo import ParallelBeam


def _discs() -> np.ndarray:
    yy, xx = np.mgrid[:90, :120]
    return (np.where(np.hypot(xx - 55, yy - 45) < 25, 1.0, 0.0)
            + np.where(np.hypot(xx - 90, yy - 55) < 9, 2.0, 0.0)).astype(np.float32)


def test_reconstruction_gives_back_the_slice():
    img = _discs()
    beam = ParallelBeam.covering(img.shape, 180)
    sino = beam.project(beam.embed(img))
    assert sino.shape == (1, 180, beam.size)
    assert abs(float(sino[0, 0].max()) - 50.0) < 1.5  # the big disc's chord through its centre
    back = beam.crop(beam.reconstruct(sino), img.shape)[0]
    assert abs(float(back[40:50, 50:60].mean()) - 1.0) < 0.03
    assert abs(float(back[53:57, 88:92].mean()) - 2.0) < 0.1
    assert float(np.abs(back[img == 0]).mean()) < 0.03


def test_an_error_on_one_projection_bin_reconstructs_as_a_line_across_the_field():
    """What a metal trace error looks like in the image: a streak along that ray, everywhere."""
    beam = ParallelBeam(size=128, n_angles=180)
    sino = np.zeros((1, 180, 128), np.float32)
    sino[0, 0, 64] = 100.0  # angle 0: the ray runs down column 64
    line = beam.reconstruct(torch.from_numpy(sino))[0].numpy()
    assert line[:, 64].mean() > 5 * np.abs(line[:, 40]).mean()
    assert np.ptp(line[20:108, 64]) < 0.2 * line[20:108, 64].mean()  # as strong far as near


def test_embed_and_crop_are_inverse_for_several_slices():
    img = _discs()
    beam = ParallelBeam.covering(img.shape, 8)
    stack = np.stack([img, 2 * img])
    assert np.array_equal(beam.crop(beam.embed(stack), img.shape), stack)
