"""Pack gives the same bytes on every x86 CPU: the SIMD / BLAS kernels a CPU selects must not reach data/packed.

The Xeon and the AMD EPYC packed the same synthetic world into LMDBs of the same size and different
hashes: the camera geometry went through OpenBLAS (pyquaternion's np.dot, np.linalg.inv, @), whose
kernels differ per CPU. A subprocess with every dispatch forced down to the generic code stands in for
the other CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PC_RANGE, REPO

from maptr.data import rigid

PACK_AND_HASH = """
import hashlib, json, sys
from pathlib import Path
from maptr.data.packing import pack_nuscenes
root, out = sys.argv[1], Path(sys.argv[2])
pack_nuscenes(dataroot=root, version="v1.0-trainval", out=str(out), pc_range={pc_range})
print(json.dumps({{str(p.relative_to(out)): hashlib.md5(p.read_bytes()).hexdigest()
                  for p in sorted(out.rglob("*")) if p.is_file()}}))
"""


def forced_down_env() -> dict[str, str]:
    """Environment that makes numpy, OpenBLAS, glibc's libm, OpenCV and ATen run their generic kernels."""
    from numpy.core._multiarray_umath import __cpu_baseline__, __cpu_features__

    dispatched = [name for name, on in __cpu_features__.items() if on and name not in __cpu_baseline__]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OPENBLAS_CORETYPE": "Prescott",  # OpenBLAS's SSE3 kernels instead of SkylakeX / Cooperlake / Zen
        "NPY_DISABLE_CPU_FEATURES": " ".join(dispatched),
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-AVX",  # libm's generic (non-FMA) variants
        "OPENCV_CPU_DISABLE": "AVX512_SKX,AVX2,FMA3,AVX",
        "ATEN_CPU_CAPABILITY": "default",
    }


def digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_pack_bytes_do_not_depend_on_the_cpu_kernels(tiny_world, packed_world, tmp_path):
    script = PACK_AND_HASH.format(pc_range=PC_RANGE)
    res = subprocess.run([sys.executable, "-c", script, str(tiny_world), str(tmp_path / "low")],
                         env=forced_down_env(), capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    low = json.loads(res.stdout.strip().splitlines()[-1])
    normal = digests(packed_world)
    assert low == normal, {k: (normal.get(k), v) for k, v in low.items() if normal.get(k) != v}


def test_rigid_arithmetic_matches_numpy_and_pyquaternion():
    from pyquaternion import Quaternion

    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        t = rng.normal(size=3) * 100
        expect = Quaternion(q).transformation_matrix
        expect[:3, 3] = t
        got = rigid.transform_matrix(t, q)
        assert np.allclose(got, expect, atol=1e-12)
        assert np.allclose(rigid.inverse(got), np.linalg.inv(expect), atol=1e-10)
        a, b = rng.normal(size=(6, 4, 4)), rng.normal(size=(6, 4, 4))
        assert np.allclose(rigid.matmul(a, b), a @ b, atol=1e-12)
    with pytest.raises(ValueError, match="zero quaternion"):
        rigid.rotation_matrix([0, 0, 0, 0])
