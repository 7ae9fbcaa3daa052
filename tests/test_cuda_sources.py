"""Every CUDA source in csrc/ still compiles for sm_90.

No GPU runs here, so this is what keeps the .cu files from rotting. They include only the CUDA
runtime (never torch headers), so a bare nvcc builds each one to an object file. Skipped only
where nvcc is absent.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
LAUNCHERS = {
    "cache_kernels.cu": ["opdisagg_reshape_and_cache_launch", "opdisagg_copy_blocks_launch",
                         "opdisagg_gather_blocks_launch", "opdisagg_scatter_blocks_launch"],
    "elementwise_kernels.cu": ["opdisagg_rms_norm_launch", "opdisagg_silu_and_mul_launch",
                               "opdisagg_rotary_embedding_launch"],
}


def find_nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cu_compiles_for_sm90(cu, tmp_path):
    obj = tmp_path / (cu.stem + ".o")
    cmd = [NVCC, "-c", "-arch=sm_90", "-O2", "-Xcompiler", "-Wall", "-I", str(CSRC), str(cu), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    assert obj.stat().st_size > 0

    # The extern "C" launchers are what the torch binding links against: they must be defined
    # with unmangled names.
    nm = shutil.which("nm")
    if nm is None or cu.name not in LAUNCHERS:
        return
    symbols = subprocess.run([nm, "-g", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    missing = [s for s in LAUNCHERS[cu.name] if s not in defined]
    assert not missing, f"{cu.name}: launcher symbols not defined: {missing}\n{symbols}"
