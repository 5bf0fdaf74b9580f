"""Build dnr: the Python package in python/dnr and its C++/CUDA extension dnr._C.

Install against the torch that is already installed (build isolation would fetch
another one):  pip install --no-build-isolation -e .

Environment switches:
  DNR_BUILD_EXT=0       pure-Python install: no extension, every op runs its
                        PyTorch reference (python/dnr/reference.py).
  DNR_BUILD_CUDA=0|1    force the CUDA kernels off or on. Default: on when torch
                        is a CUDA build and a CUDA toolkit (nvcc) is found.
  CUDA_HOME             CUDA toolkit root; found from nvcc when unset.
  TORCH_CUDA_ARCH_LIST  GPU architectures; "9.0" when unset and no GPU is visible.
  MAX_JOBS              parallel compile jobs.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def env_switch(name):
    """True / False for an env var set to 1 / 0, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name}={os.environ[name]!r}: expected 0 or 1")


def log(message):
    print(f"dnr setup: {message}", file=sys.stderr)


def toolkit_root():
    """Root of the CUDA toolkit that `nvcc` runs, or None.

    nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc), so its own directory says nothing; a dry run
    makes the real nvcc print its root as `#$ TOP=...`.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
        return next((c for c in candidates if os.path.isfile(os.path.join(c, "bin", "nvcc"))), None)
    try:
        run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=120,
        )
        top = re.search(r"^#\$ TOP=(.+?)\s*$", run.stdout + run.stderr, re.MULTILINE)
        if top:
            return os.path.realpath(top.group(1))
    except (OSError, subprocess.SubprocessError) as error:
        log(f"could not run {nvcc} --dryrun ({error}); guessing CUDA_HOME from its path")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvidia_wheel_includes():
    """include/ folders of pip's nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN headers that
    torch's CUDA headers include), cu13 and cudnn first."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            include = os.path.realpath(include)
            if include not in found:
                found.append(include)
    rank = {"cu13": 0, "cudnn": 1}
    return sorted(found, key=lambda p: rank.get(Path(p).parent.name, 2))


def extension_modules():
    """([dnr._C extension], cmdclass), or ([], {}) for a pure-Python install."""
    if env_switch("DNR_BUILD_EXT") is False:
        log("DNR_BUILD_EXT=0: no extension; all ops use the PyTorch reference")
        return [], {}

    import torch

    want_cuda = env_switch("DNR_BUILD_CUDA")
    cuda = False
    if want_cuda is not False and torch.version.cuda is not None:
        if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
            root = toolkit_root()
            if root is not None:
                os.environ["CUDA_HOME"] = root  # read when cpp_extension is imported
        cuda = bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    if want_cuda and not cuda:
        sys.exit(
            "setup.py: DNR_BUILD_CUDA=1 but "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        )

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # csrc/*.cpp: schemas and device-generic ops; csrc/cpu/*.cpp: CPU kernels.
    sources = [str(p.relative_to(ROOT)) for p in [*sorted(CSRC.glob("*.cpp")), *sorted((CSRC / "cpu").glob("*.cpp"))]]
    cxx_flags = ["-O3"]  # torch chooses the C++ standard its headers need
    options = dict(
        include_dirs=[str(CSRC)],
        # The module is a stub (csrc/dnr.cpp): one abi3 binary serves every CPython >= 3.10.
        py_limited_api=True,
    )
    if cuda:
        cuda_sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        log(
            f"CUDA build: CUDA_HOME={os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}, "
            f"{len(cuda_sources)} .cu file(s)"
        )
        options["include_dirs"] += nvidia_wheel_includes()
        ext = CUDAExtension(
            "dnr._C",
            sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DDNR_WITH_CUDA"],
                "nvcc": ["-O3", "-DDNR_WITH_CUDA", "--expt-relaxed-constexpr"],
            },
            **options,
        )
    else:
        log("CPU-only build" + (" (torch is a CPU build)" if torch.version.cuda is None else ""))
        ext = CppExtension("dnr._C", sources, extra_compile_args={"cxx": cxx_flags}, **options)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"dnr.data": ["_embedded/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
