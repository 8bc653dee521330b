from __future__ import annotations

import numpy as np
import pytest

from prostate_jrs.phantom.shapes import Ellipsoid, Tube, occupancy


def _points(*xyz: tuple[float, float, float]) -> np.ndarray:
    return np.array(xyz, dtype=np.float32).T


def test_ellipsoid_sdf_sign_and_surface() -> None:
    shape = Ellipsoid((10.0, 0.0, 0.0), (20.0, 10.0, 5.0))
    sdf = shape.sdf(_points((10, 0, 0), (30, 0, 0), (10, 10, 0), (10, 0, 5), (40, 0, 0)))
    assert sdf[0] < 0
    np.testing.assert_allclose(sdf[1:4], 0.0, atol=1e-4)
    assert sdf[4] == pytest.approx(10.0, abs=0.5)
    assert shape.shrunk(2.0).sdf(_points((30, 0, 0)))[0] == pytest.approx(2.0, abs=1e-4)


def test_rotated_ellipsoid_bbox_holds_it() -> None:
    shape = Ellipsoid((0.0, 0.0, 0.0), (30.0, 5.0, 5.0), (0.0, 0.0, 90.0))
    _, hi = shape.bbox()
    np.testing.assert_allclose(hi, [5.0, 30.0, 5.0], atol=1e-6)
    assert shape.sdf(_points((0, 29, 0)))[0] < 0


def test_tube_distance_and_arc_parameter() -> None:
    tube = Tube(np.array([[0, 0, 0], [0, 0, 100]]), np.array([5.0, 10.0]))
    sdf, foot, t = tube.nearest(_points((0, 0, 50), (20, 0, 50), (0, 0, -10)))
    assert sdf[0] == pytest.approx(-7.5, abs=1e-4)
    assert sdf[1] == pytest.approx(12.5, abs=1e-4)
    assert sdf[2] == pytest.approx(5.0, abs=1e-4)
    np.testing.assert_allclose(t, [0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(foot[:, 1], [0, 0, 50], atol=1e-4)


def test_tube_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="radii"):
        Tube(np.zeros((3, 3)), np.array([1.0, -1.0, 1.0]))


def test_occupancy_ramp() -> None:
    np.testing.assert_allclose(occupancy(np.array([-5.0, 0.0, 0.25, 5.0]), 1.0), [1.0, 0.5, 0.25, 0.0])
