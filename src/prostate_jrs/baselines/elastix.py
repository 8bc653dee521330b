"""Iterative B-spline registration with elastix (itk-elastix): the classical baseline the network is measured against.

The settings follow what the prostate-CT registration literature runs with elastix (Qiao et al. 2017, Elmahdy
et al. 2019): a multi-resolution B-spline (4 levels, Gaussian pyramid), final control-point spacing 10 mm,
normalised correlation for CT to CT, adaptive stochastic gradient descent with 500 iterations per level on 4096
random samples. Callers that have a rigid pre-alignment (the app's pipeline, on bone) give elastix the planning CT
resampled through it, so the B-spline models only the deformation, as the network does.

The result is converted to the project's DDF convention (docs/ARCHITECTURE.md, "DDF convention";
:mod:`prostate_jrs.geometry`): a ``(3, I, J, K)`` displacement on the fixed grid, in voxel units of that grid,
pulling the moving image back.
elastix's deformation field is that displacement in world millimetres (``moving point = x + u(x)``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import array_from_image, world_to_index
from prostate_jrs.hounsfield import AIR_HU

__all__ = ["ElastixResult", "ElastixSettings", "register_bspline", "world_ddf_to_voxels"]


@dataclass(frozen=True)
class ElastixSettings:
    """Parameters of the multi-resolution B-spline registration.

    Args:
        grid_spacing_mm: final B-spline control-point spacing.
        resolutions: pyramid levels.
        iterations: optimizer iterations per level.
        spatial_samples: random samples per iteration.
        metric: elastix metric (``AdvancedNormalizedCorrelation`` for CT to CT, or ``AdvancedMattesMutualInformation``).
        threads: elastix threads; ``None`` for elastix's default (all cores).
    """

    grid_spacing_mm: float = 10.0
    resolutions: int = 4
    iterations: int = 500
    spatial_samples: int = 4096
    metric: str = "AdvancedNormalizedCorrelation"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.grid_spacing_mm <= 0 or self.resolutions < 1 or self.iterations < 1 or self.spatial_samples < 1:
            raise ValueError(f"elastix settings must be positive: {self}")

    @classmethod
    def tiny(cls) -> ElastixSettings:
        """Seconds-long settings for smoke tests: 2 levels, 20 iterations, 16 mm grid."""
        return replace(cls(), grid_spacing_mm=16.0, resolutions=2, iterations=20, spatial_samples=1024)

    def parameter_maps(self) -> list[dict[str, list[str]]]:
        """The elastix parameter map(s), as elastix's text values."""
        return [
            {
                "Registration": ["MultiResolutionRegistration"],
                "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
                "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
                "NumberOfResolutions": [str(self.resolutions)],
                "Transform": ["BSplineTransform"],
                "FinalGridSpacingInPhysicalUnits": [f"{self.grid_spacing_mm:g}"],
                "HowToCombineTransforms": ["Compose"],
                "Metric": [self.metric],
                "Optimizer": ["AdaptiveStochasticGradientDescent"],
                "MaximumNumberOfIterations": [str(self.iterations)],
                "AutomaticParameterEstimation": ["true"],
                "ImageSampler": ["RandomCoordinate"],
                "NumberOfSpatialSamples": [str(self.spatial_samples)],
                "NewSamplesEveryIteration": ["true"],
                "CheckNumberOfSamples": ["true"],
                "Interpolator": ["BSplineInterpolator"],
                "BSplineInterpolationOrder": ["1"],
                "ResampleInterpolator": ["FinalBSplineInterpolator"],
                "FinalBSplineInterpolationOrder": ["3"],
                "Resampler": ["DefaultResampler"],
                "DefaultPixelValue": [f"{AIR_HU:g}"],
                "ErodeMask": ["false"],
                "FixedInternalImagePixelType": ["float"],
                "MovingInternalImagePixelType": ["float"],
                "WriteResultImage": ["false"],
                "ResultImageFormat": ["nii"],
            }
        ]


@dataclass(frozen=True)
class ElastixResult:
    """Outcome of :func:`register_bspline`.

    Attributes:
        ddf: ``(3, I, J, K)`` float32 displacement on the fixed grid in its voxel units (project convention).
        ddf_world_mm: ``(3, I, J, K)`` the same displacement in world millimetres (LPS), as elastix gives it.
        seconds: wall time of registration plus deformation-field computation.
    """

    ddf: np.ndarray
    ddf_world_mm: np.ndarray
    seconds: float


def _to_itk(image: sitk.Image, dtype: type = np.float32) -> Any:  # itk image types exist only at run time
    import itk

    converted = itk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(dtype)))
    converted.SetOrigin(image.GetOrigin())
    converted.SetSpacing(image.GetSpacing())
    converted.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return converted


def world_ddf_to_voxels(ddf_world_mm: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Displacement in world millimetres ``(3, I, J, K)`` to voxel units of ``grid`` (project convention)."""
    linear = world_to_index(grid)[:3, :3]
    return np.tensordot(linear, np.asarray(ddf_world_mm, dtype=np.float64), axes=1).astype(np.float32)


def register_bspline(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: ElastixSettings | None = None,
    fixed_mask: sitk.Image | None = None,
) -> ElastixResult:
    """Register ``moving`` (planning CT, aligned on bone) to ``fixed`` (daily CT) with a B-spline.

    Args:
        fixed: daily CT (HU), any grid.
        moving: planning CT (HU), any grid in the same world coordinates.
        settings: registration parameters; defaults to :class:`ElastixSettings`.
        fixed_mask: optional region of ``fixed`` (non-zero) where the metric is sampled, on ``fixed``'s grid.

    Returns:
        The displacement on ``fixed``'s grid.

    Raises:
        ImportError: if itk-elastix is not installed (``pip install prostate-jrs[bench]``).
        ValueError: if the mask does not lie on the fixed grid.
    """
    try:
        import itk
    except ImportError as error:  # pragma: no cover - the bench extra is part of the test environment
        raise ImportError("elastix baseline needs itk-elastix: pip install 'prostate-jrs[bench]'") from error
    settings = settings or ElastixSettings()
    parameters = itk.ParameterObject.New()
    for parameter_map in settings.parameter_maps():
        parameters.AddParameterMap(parameter_map)
    registration = itk.ElastixRegistrationMethod.New(_to_itk(fixed), _to_itk(moving))
    registration.SetParameterObject(parameters)
    registration.SetLogToConsole(False)
    if settings.threads is not None:
        registration.SetNumberOfThreads(int(settings.threads))
    if fixed_mask is not None:
        if fixed_mask.GetSize() != fixed.GetSize():
            raise ValueError(f"fixed mask of size {fixed_mask.GetSize()} is not on the fixed grid {fixed.GetSize()}")
        mask = _to_itk(sitk.Cast(fixed_mask != 0, sitk.sitkUInt8), np.uint8)
        registration.SetFixedMask(mask)
    start = time.perf_counter()
    registration.Update()
    # transformix writes deformationField.nii into its output folder, the working directory unless told otherwise
    with tempfile.TemporaryDirectory(prefix="prostate-jrs-transformix-") as scratch:
        transformix = itk.TransformixFilter.New(_to_itk(moving))
        transformix.SetTransformParameterObject(registration.GetTransformParameterObject())
        transformix.SetComputeDeformationField(True)
        transformix.SetLogToConsole(False)
        transformix.SetOutputDirectory(scratch)
        transformix.Update()
        field = np.asarray(itk.GetArrayFromImage(transformix.GetOutputDeformationField()), dtype=np.float64)
    seconds = time.perf_counter() - start
    # itk vector image as array: (K, J, I, 3); back to the project's (3, I, J, K) through a SimpleITK image
    as_sitk = sitk.GetImageFromArray(field, isVector=True)
    as_sitk.CopyInformation(fixed)
    world = np.moveaxis(array_from_image(as_sitk), -1, 0)
    return ElastixResult(ddf=world_ddf_to_voxels(world, fixed), ddf_world_mm=world.astype(np.float32), seconds=seconds)
