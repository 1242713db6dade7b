"""Rigid-transform arithmetic that gives the same bits on every x86 CPU.

``np.matmul``, ``np.dot``, ``np.linalg.inv`` and pyquaternion's ``rotation_matrix`` (``np.dot`` inside)
call OpenBLAS / LAPACK, which pick a kernel per CPU (SkylakeX, Cooperlake, Haswell, Zen, ...); the
kernels sum in different orders and with or without FMA, so the same nuScenes poses gave packed
geometry that differed in the last bits between an Intel Xeon and an AMD EPYC, and DVC saw a different
``data/packed``. Here every product is a fixed sequence of numpy's element-wise ``*`` and ``+``, each
correctly rounded by IEEE 754 whatever SIMD width runs it, and the inverse of a rigid transform is its
closed form: the bytes depend on the inputs only (``tests/test_pack.py`` packs with OpenBLAS forced to
other kernels and compares md5s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for small (stacks of) matrices, summed over k = 0, 1, ... in that order."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def chain(*mats: np.ndarray) -> np.ndarray:
    """``mats[0] @ mats[1] @ ...`` evaluated left to right with :func:`matmul`."""
    out = mats[0]
    for m in mats[1:]:
        out = matmul(out, m)
    return np.asarray(out, dtype=np.float64)


def rotation_matrix(wxyz: Sequence[float]) -> np.ndarray:
    """(3, 3) rotation of the quaternion (w, x, y, z), normalized first (as pyquaternion does)."""
    w, x, y, z = (float(v) for v in wxyz)
    norm = math.sqrt(w * w + x * x + y * y + z * z)
    if norm == 0.0:
        raise ValueError("zero quaternion has no rotation")
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array(
        [
            [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
            [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
            [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
        ]
    )


def transform_matrix(translation: Sequence[float], rotation_wxyz: Sequence[float]) -> np.ndarray:
    """(4, 4) rigid transform from a nuScenes translation and (w, x, y, z) quaternion."""
    mat = np.eye(4)
    mat[:3, :3] = rotation_matrix(rotation_wxyz)
    mat[:3, 3] = np.asarray(translation, dtype=np.float64)
    return mat


def inverse(mat: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rigid transform [R t; 0 1]: [R^T, -R^T t; 0 1]."""
    mat = np.asarray(mat, dtype=np.float64)
    rot_t = mat[:3, :3].T
    out = np.eye(4)
    out[:3, :3] = rot_t
    out[:3, 3] = -matmul(rot_t, mat[:3, 3:4])[:, 0]
    return out
