"""Build script: pure-Python package plus the mapped Triton folder `kernels/` -> `source_fast.kernels`.

The compiled extension (csrc/, CMake) is added by `_build_ext.py` when present; see README "Building".
"""
from setuptools import setup

PACKAGES = ["source_fast", "source_fast.reference", "source_fast.kernels"]

setup(
    packages=PACKAGES,
    # `kernels/` must never be importable as top-level `kernels` (a PyPI name that is taken).
    package_dir={"source_fast": "source_fast", "source_fast.kernels": "kernels"},
)
