"""Build script: the Python package, the mapped Triton folder `kernels/` -> `source_fast.kernels`, and
the optional compiled module `source_fast._C` (torch-free pybind11 + OpenMP, CUDA when available),
built by CMake (CMakeLists.txt) into the fixed directory build/cmake and copied into the package.

Switches (environment variables, read here only, never modified):

* ``SOURCE_FAST_BUILD_EXT=auto|0|1`` (default auto): auto builds the module when cmake and a C++
  compiler work and otherwise prints why and installs the pure-Python package (every op still runs on
  the torch backend); 0 skips it; 1 makes any build failure an error.
* ``SOURCE_FAST_BUILD_CUDA=auto|0|1`` (default auto): auto adds the CUDA kernels only if ``nvcc`` is
  on PATH (or ``CUDACXX``) *and* the installed torch is a CUDA build (``torch.version.cuda``); 1
  requires nvcc; 0 builds CPU kernels only.
* ``SOURCE_FAST_CPU_NATIVE=1|0`` (default 1): compile the CPU kernels with -march=native (AVX-512 /
  AVX2 micro-kernels for this machine); 0 for a binary that must run on other x86-64 CPUs.
* ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0+PTX") or ``CUDAARCHS`` ("80;90") pick CUDA architectures
  (default 80;90); ``MAX_JOBS`` caps build parallelism; ``NVCC_THREADS`` is passed to nvcc --threads.

Fast edit loop: ``pip install --no-build-isolation -e .`` (seconds when nothing changed). Nothing is
downloaded here: cmake/ninja come from the build environment (pyproject.toml) or PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGES = ["source_fast", "source_fast.reference", "source_fast.kernels"]
ROOT = Path(__file__).resolve().parent
BUILD_DIR = ROOT / "build" / "cmake"  # fixed: incremental rebuilds across pip invocations
MODULE_OUT = BUILD_DIR / "module"


def _switch(name: str) -> str:
    raw = os.environ.get(name, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "on", "true", "yes"):
        return "1"
    if raw in ("0", "off", "false", "no"):
        return "0"
    raise SystemExit(f"{name} must be one of auto, 0, 1 (got {os.environ.get(name)!r})")


def _log(msg: str) -> None:
    print(f"source_fast setup: {msg}", flush=True)


def _tool(module: str, attr: str, exe: str) -> str | None:
    """A build tool from its pip package (build env or venv), else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except Exception:  # not installed or an unexpected layout: fall back to PATH
        pass
    return shutil.which(exe)


def _torch_cuda() -> tuple[bool, str | None]:
    """(torch importable here, torch.version.cuda)."""
    try:
        import torch  # noqa: PLC0415 (optional at build time)
    except Exception:
        return False, None
    return True, getattr(torch.version, "cuda", None)


def _nvcc() -> str | None:
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and Path(cudacxx).exists():
        return cudacxx
    return shutil.which("nvcc")


def _cuda_architectures() -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a") -> CMake form ("80-real;90"); else CUDAARCHS; else 80;90."""
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if torch_list:
        archs = []
        for item in re.split(r"[;\s,]+", torch_list):
            if not item:
                continue
            m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
            if not m:
                raise SystemExit(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not of the form 8.0, 9.0a or 8.6+PTX")
            arch = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
            archs.append(arch if m.group(4) else f"{arch}-real")
        return ";".join(archs)
    return os.environ.get("CUDAARCHS", "").strip() or "80;90"


def _wipe_stale_cache(cmake: str, generator: str, make_program: str | None, cuda_compiler: str | None) -> None:
    """Isolated builds bring cmake/ninja from new temp paths each time: a cache naming old ones is stale."""
    cache = BUILD_DIR / "CMakeCache.txt"
    if not cache.exists():
        return
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        m = re.match(r"([A-Za-z_0-9]+):[A-Z]+=(.*)", line)
        if m:
            entries[m.group(1)] = m.group(2)
    wanted = {"CMAKE_COMMAND": cmake, "CMAKE_GENERATOR": generator}
    if make_program:
        wanted["CMAKE_MAKE_PROGRAM"] = make_program
    if cuda_compiler and "CMAKE_CUDA_COMPILER" in entries:
        wanted["CMAKE_CUDA_COMPILER"] = cuda_compiler
    stale = [k for k, v in wanted.items() if k in entries and os.path.realpath(entries[k]) != os.path.realpath(v)
             and entries[k] != v]
    if stale:
        _log(f"removing stale CMake cache in {BUILD_DIR} ({', '.join(stale)} changed)")
        shutil.rmtree(BUILD_DIR, ignore_errors=True)


class CMakeExtension(Extension):
    def __init__(self, name: str, required: bool):
        super().__init__(name, sources=[], optional=not required)


class CMakeBuild(build_ext):
    """Configure + build the `_C` target with CMake, then copy the module where setuptools expects it
    (build_lib, and the source tree for editable installs: setuptools copies it there)."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        mode = _switch("SOURCE_FAST_BUILD_EXT")
        try:
            self._build_cmake(ext)
        except Exception as exc:
            if mode == "1":
                raise
            _log(f"compiled extension source_fast._C NOT built: {exc}")
            _log("the package still works on the torch backend; set SOURCE_FAST_BUILD_EXT=1 to make this an error")
            self._remove_stale_inplace(ext)

    def _remove_stale_inplace(self, ext):
        """An editable install must not keep a module from an older build next to newer sources."""
        stale = ROOT / "source_fast" / Path(self.get_ext_filename(self.get_ext_fullname(ext.name))).name
        if self.editable_mode or self.inplace:
            if stale.exists():
                stale.unlink()
                _log(f"removed the module of an earlier build, {stale}")

    def _build_cmake(self, ext):
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake, or put cmake on PATH)")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"

        cuda_mode = _switch("SOURCE_FAST_BUILD_CUDA")
        nvcc = _nvcc()
        if cuda_mode == "1":
            if nvcc is None:
                raise RuntimeError("SOURCE_FAST_BUILD_CUDA=1 but nvcc was not found on PATH (or CUDACXX)")
            with_cuda = True
        elif cuda_mode == "0":
            with_cuda = False
        else:
            has_torch, torch_cuda = _torch_cuda()
            with_cuda = nvcc is not None and torch_cuda is not None
            if not with_cuda:
                if nvcc is None:
                    why = "nvcc not found"
                elif not has_torch:
                    why = "torch is not importable in this build environment (isolated build?)"
                else:
                    why = "torch is a CPU build"
                _log(f"building CPU kernels only ({why}; SOURCE_FAST_BUILD_CUDA=1 forces CUDA)")
        _wipe_stale_cache(cmake, generator, ninja if ninja else None, nvcc if with_cuda else None)

        import pybind11  # noqa: PLC0415 (build requirement)

        args = [
            f"-S{ROOT}",
            f"-B{BUILD_DIR}",
            f"-G{generator}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DSOURCE_FAST_OUTPUT_DIR={MODULE_OUT}",
            "-DSOURCE_FAST_BUILD_MODULE=ON",
            f"-DSOURCE_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DSOURCE_FAST_CPU_NATIVE={'OFF' if _switch('SOURCE_FAST_CPU_NATIVE') == '0' else 'ON'}",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if with_cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_architectures()}"]
            if os.environ.get("NVCC_THREADS", "").strip():
                args.append(f"-DSOURCE_FAST_NVCC_THREADS={os.environ['NVCC_THREADS'].strip()}")
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        _log(f"cmake configure ({generator}, CUDA {'ON' if with_cuda else 'OFF'}) in {BUILD_DIR}")
        subprocess.run([cmake, *args], check=True, cwd=ROOT)
        subprocess.run([cmake, "--build", str(BUILD_DIR), "--target", "_C", "-j", jobs], check=True, cwd=ROOT)

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built = MODULE_OUT / f"_C{suffix}"
        if not built.exists():
            candidates = sorted(MODULE_OUT.glob("_C*.so")) + sorted(MODULE_OUT.glob("_C*.pyd"))
            if not candidates:
                raise RuntimeError(f"CMake finished but no _C module was found in {MODULE_OUT}")
            built = candidates[0]
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, dest)
        _log(f"built {dest.name} -> {dest}")


def _ext_modules():
    mode = _switch("SOURCE_FAST_BUILD_EXT")
    if mode == "0":
        _log("SOURCE_FAST_BUILD_EXT=0: skipping the compiled extension (torch backend only)")
        for old in sorted((ROOT / "source_fast").glob("_C*.so")) + sorted((ROOT / "source_fast").glob("_C*.pyd")):
            _log(f"note: {old} from an earlier build is still importable; delete it to run without it")
        return []
    return [CMakeExtension("source_fast._C", required=(mode == "1"))]


setup(
    packages=PACKAGES,
    # `kernels/` must never be importable as top-level `kernels` (a PyPI name that is taken).
    package_dir={"source_fast": "source_fast", "source_fast.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
