"""Property-based fuzzing of the case loader and ``run_volume`` (issue 11).

Random headers (affines, voxel sizes, scaling, dimensions, voxel types) and random values (NaN, inf,
values at and beyond the float32 limits) must give a finite map aligned with the input, or an
``InputError``: never another exception. Derandomized and bounded to a few dozen examples each, so the
run is repeatable and takes seconds.
"""

from __future__ import annotations

import gzip
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from napari_clip_ad import build_method, run_volume
from napari_clip_ad.errors import InputError
from napari_clip_ad.io import load_case, save_volume

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASE = "BraTS-GLI-80001-000"
NAN, INF = float("nan"), float("inf")
SPECIAL = [7.5, 0.0, 1.0, -1.0, 1e-40, 3.3e38, -3.3e38, 3.4028235e38, -3.4028235e38, 1e39, 1e300, -1e300, NAN, INF, -INF]
NEAR_LIMIT = [3.3e38, -3.3e38, 3.4028235e38, -3.4028235e38, 1.0]
HEADER_NUMBERS = [0.0, 1.0, -1.0, 2.5, 0.3, 1e-6, 1e30, -1e30, NAN, INF]
FILE_DTYPES = ["float32", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64", "complex64", "rgb"]


@pytest.fixture(scope="module")
def vand():
    return build_method("vand", "tiny-test", device="cpu", image_size=32)


def _elements() -> st.SearchStrategy[float]:
    """Ordinary intensities and special values, or only finite values at the float32 limit (their span overflows)."""
    return st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from(SPECIAL), st.sampled_from(NEAR_LIMIT))


def _values(dtype: str, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    if dtype == "rgb":
        return arrays(np.uint8, (*shape, 3)).map(_as_rgb)
    if dtype.startswith(("float", "complex")):
        width = 32 if dtype in ("float32", "complex64") else 64
        elements = _elements()
        if width == 32:  # values that do not fit a float32 are generated as float64, then cast like a scanner would
            return arrays(np.float64, shape, elements=elements, fill=st.nothing()).map(lambda a: _cast32(a, dtype))
        return arrays(np.float64, shape, elements=elements, fill=st.nothing()).map(lambda a: a.astype(dtype))
    return arrays(np.dtype(dtype), shape, fill=st.nothing())


def _cast32(values: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def _as_rgb(channels: np.ndarray) -> np.ndarray:
    rgb = np.zeros(channels.shape[:-1], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for index, name in enumerate("RGB"):
        rgb[name] = channels[..., index]
    return rgb


@st.composite
def nifti_files(draw) -> tuple[np.ndarray, dict]:
    """Random voxels and a dict of header fields to patch in afterwards."""
    shape = draw(st.one_of(st.tuples(*[st.integers(1, 5)] * 3), st.tuples(*[st.integers(1, 4)] * 3, st.integers(1, 2))))
    data = draw(_values(draw(st.sampled_from(FILE_DTYPES)), shape))
    fields: dict = {}
    if draw(st.booleans()):
        zoom = st.one_of(st.floats(0.2, 5.0), st.sampled_from(HEADER_NUMBERS))  # half plausible, half odd
        fields["pixdim"] = [1.0, *[draw(zoom) for _ in range(3)], 1, 1, 1, 1]
    kind = draw(st.sampled_from(["lps", "lps", "random", "special", "qform"]))
    if kind == "random":
        rows = [[draw(st.floats(-3, 3)) for _ in range(3)] + [draw(st.floats(-200, 200))] for _ in range(3)]
        fields.update(srow_x=rows[0], srow_y=rows[1], srow_z=rows[2], sform_code=1)
    elif kind == "special":
        rows = [[draw(st.sampled_from(HEADER_NUMBERS)) for _ in range(4)] for _ in range(3)]
        fields.update(srow_x=rows[0], srow_y=rows[1], srow_z=rows[2], sform_code=draw(st.sampled_from([0, 1, 2])))
    elif kind == "qform":
        fields.update(sform_code=0, qform_code=1, quatern_b=draw(st.sampled_from(HEADER_NUMBERS)),
                      quatern_c=draw(st.floats(-1, 1)), quatern_d=draw(st.floats(-1, 1)))
    if draw(st.booleans()):
        fields.update(scl_slope=draw(st.sampled_from(HEADER_NUMBERS + [1e38])), scl_inter=draw(st.sampled_from(HEADER_NUMBERS)))
    if draw(st.sampled_from([False, False, False, False, True])):  # sampled_from shrinks to its first item
        dim = [len(shape), *shape] + [1] * (7 - len(shape))
        dim[draw(st.integers(0, len(shape)))] = draw(st.sampled_from([0, -1, 9, 1000]))
        fields["dim"] = dim
    return data, fields


def _write(folder: Path, data: np.ndarray, fields: dict) -> Path:
    folder.mkdir(parents=True)
    path = folder / f"{CASE}-t2w.nii.gz"
    raw = bytearray(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]), dtype=data.dtype).to_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    return path


def _check_result(result, shape: tuple[int, int, int]) -> None:
    assert result.anomaly_map.shape == shape and result.anomaly_map.dtype == np.float32
    assert np.isfinite(result.anomaly_map).all() and np.isfinite(result.scores).all()
    assert result.anomaly_map.min() >= 0.0 and result.anomaly_map.max() <= 1.0


@FUZZ
@given(nifti_files())
def test_case_loader_and_run_volume_give_a_finite_aligned_map_or_an_input_error(vand, file):
    data, fields = file
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel's and numpy's warnings about odd headers are not the point here
        folder = Path(tmp) / CASE
        source = _write(folder, data, fields)
        try:
            case = load_case(folder)
        except InputError as exc:
            event(f"load refused: {str(exc).split(': ', 1)[-1][:30]}")
            return
        image = case.images["t2w"]
        assert image.dtype == np.float32 and image.shape == case.shape and np.isfinite(image).all()
        assert all(np.isfinite(case.spacing)) and min(case.spacing) > 0
        try:
            result = run_volume(case, vand, modality="t2w")
        except InputError as exc:
            event(f"run refused: {str(exc).split(': ', 2)[-1][:30]}")
            return
        event("map made")
        _check_result(result, case.shape)
        saved = nib.load(save_volume(result.anomaly_map, case, Path(tmp) / "map.nii.gz"))
        loaded = nib.load(source)
        assert saved.shape == loaded.shape[:3]
        np.testing.assert_allclose(saved.affine, loaded.affine, rtol=1e-6, atol=1e-4)


_ARRAY_DTYPES = st.sampled_from(["float32", "float64", "float32", "float64", "float16", "int16", "uint8", "int64", "bool",
                                 "complex64", "object"])


@st.composite
def raw_volumes(draw) -> np.ndarray:
    dtype = draw(_ARRAY_DTYPES)
    volume_3d = st.tuples(*[st.integers(1, 6)] * 3)
    shape = draw(st.one_of(volume_3d, volume_3d, array_shapes(min_dims=2, max_dims=4, min_side=0, max_side=5)))
    elements = _elements()
    values = draw(arrays(np.float64, shape, elements=elements, fill=st.nothing()))
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


@FUZZ
@given(raw_volumes(), st.sampled_from(["axial", "coronal", "sagittal"]), st.sampled_from(["t2w", "t1c+t2w+t2f"]))
def test_run_volume_on_arrays_gives_a_finite_aligned_map_or_an_input_error(vand, volume, axis, modality):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = run_volume(volume, vand, modality=modality, axis=axis)
        except InputError as exc:
            event(f"refused: {str(exc).split(': ', 1)[-1][:30]}")
            return
    event("map made")
    assert volume.ndim == 3 and volume.dtype.kind in "iuf"
    _check_result(result, volume.shape)
