"""Triton kernels of source_fast, installed as `source_fast.kernels` (one file per op).

Never import this folder as top-level `kernels`: that PyPI name belongs to another project (Hugging
Face's kernel hub). It happens by accident when a source checkout's root is on sys.path (Python started
in it), and libraries probe for that project: transformers imports `kernels` when it finds one without
package metadata. So under that name this folder is an empty shell that looks like a stray namespace
directory (no __file__, no version, no submodules; transformers then reports the package as absent), and
any use of it raises an ImportError that says what to import instead.
"""
if __name__ != "source_fast.kernels":
    _MESSAGE = (f"this folder must be imported as 'source_fast.kernels', not {__name__!r}: the top-level name "
                "'kernels' belongs to another project; install source_fast (pip install -e .) and import "
                "source_fast.kernels")
    __file__ = None  # noqa: F811  (what a namespace directory has: probes treat it as not installed)
    __path__ = []  # no submodules under this name

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(_MESSAGE)
