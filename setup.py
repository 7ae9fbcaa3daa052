"""Build of opdisagg_rt and its C++ extension opdisagg_rt._C.

Install with `pip install --no-build-isolation -e .` (torch must already be installed: the
extension compiles against that torch, and an isolated build would fetch another one).
The CUDA sources in csrc/cuda are built only when CUDA_HOME is set and torch has CUDA; the CPU
kernels are always built.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:
    raise SystemExit("opdisagg_rt builds against an installed torch: `pip install torch==2.13.0`, "
                     "then `pip install --no-build-isolation -e .`") from e

# Sources and package dirs must be relative to this file, wherever pip runs it from.
os.chdir(os.path.dirname(os.path.abspath(__file__)))

# Repo-root folders installed as subpackages of opdisagg_rt (see DESIGN.md, Layout).
EXTRA_ROOTS = ("kernels", "scheduler")


def packages():
    pkgs = find_packages(include=["opdisagg_rt", "opdisagg_rt.*"])
    package_dir = {}
    for root in EXTRA_ROOTS:
        # find_packages picks up future subfolders (kernels/<sub>/) that have an __init__.py.
        pkgs += [f"opdisagg_rt.{p}" for p in find_packages(include=[root, f"{root}.*"])]
        package_dir[f"opdisagg_rt.{root}"] = root
    return pkgs, package_dir


def with_cuda():
    if os.environ.get("OPDISAGG_RT_NO_CUDA", "0") == "1":
        return False
    return CUDA_HOME is not None and (torch.cuda.is_available() or torch.version.cuda is not None)


def extension():
    # rpath to torch's lib dir: `import opdisagg_rt._C` then works even before `import torch`
    # (the loader finds libc10/libtorch by themselves; torch is pinned, so the path stays valid).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ldflags = ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # including file is compiled with OpenMP (torch's CPU wheel uses the OpenMP backend).
    cxx = ["-O3", "-fopenmp"]
    if not with_cuda():
        return CppExtension("opdisagg_rt._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=ldflags)
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("opdisagg_rt._C", sources,
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                         extra_link_args=ldflags)


pkgs, package_dir = packages()
setup(
    packages=pkgs,
    package_dir=package_dir,
    # Data the analysis framework reads at run time (device specs, the measured CPU profile).
    package_data={"opdisagg_rt.analysis": ["*.yaml", "data/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
