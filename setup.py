"""Builds spark_kernels._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of
torch are present. Build against the installed torch, without build isolation:

    pip install -e . --no-build-isolation

Environment: SPARK_KERNELS_NO_CUDA=1 skips the CUDA kernels; SPARK_KERNELS_PORTABLE=1 drops
-march=native (for binaries that move to other CPUs); TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _default_cuda_home() -> None:
    """torch guesses CUDA_HOME from the location of `nvcc` on the PATH, which is wrong when that is a
    wrapper outside the toolkit (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc):
    ask nvcc where it lives instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if "_HERE_=" in line:
            os.environ["CUDA_HOME"] = os.path.dirname(line.split("_HERE_=", 1)[1].strip())
            return


def extension_modules():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("SPARK_KERNELS_NO_CUDA", "0") != "1"
    with_cuda = bool(want_cuda and cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME)
    if want_cuda and not with_cuda:
        print("spark_kernels: building without CUDA kernels (nvcc or a CUDA build of torch not found)",
              file=sys.stderr)

    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    if os.environ.get("SPARK_KERNELS_PORTABLE", "0") != "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        return [cpp_extension.CppExtension("spark_kernels._C", cpu_sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # torch's CUDA wheels ship the CUDA headers ATen needs (cusparse.h, ...) under nvidia/cu13/include.
    try:
        import nvidia  # noqa: F401 - present with every CUDA build of torch from PyPI
    except ImportError:  # torch from elsewhere (conda, a container): the toolkit's own headers serve
        nvidia = None
    for root in nvidia.__path__ if nvidia else ():
        include_dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    nvcc = ["-O3", "-std=c++20", "-DSPARK_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr"]
    return [cpp_extension.CUDAExtension("spark_kernels._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                                        extra_compile_args={"cxx": cxx + ["-DSPARK_KERNELS_WITH_CUDA"],
                                                            "nvcc": nvcc},
                                        extra_link_args=["-fopenmp"])]


def main():
    _default_cuda_home()  # before torch.utils.cpp_extension reads it at import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="spark-kernels",
        version="0.1.0",
        description="Fused sparse kernels and a model layer for SparK masked pretraining of convnets",
        packages=find_packages(include=["spark_kernels", "spark_kernels.*", "spark", "spark.*"]),
        package_data={"spark": ["data/*"]},
        python_requires=">=3.10",
        ext_modules=extension_modules(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        entry_points={"console_scripts": ["spark-pretrain=spark.pretrain:main", "spark-plot=spark.plot:main",
                                          "spark-evaluate=spark.evaluate:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
