"""Triton kernels of source_fast, installed as `source_fast.kernels` (one file per op).

Never import this folder as top-level `kernels`: that PyPI name belongs to another project.
"""
if __name__ != "source_fast.kernels":
    raise ImportError(
        f"this folder must be imported as 'source_fast.kernels', not {__name__!r}; "
        "install the project (pip install -e .) and import source_fast.kernels"
    )
