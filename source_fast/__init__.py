"""source_fast: fast, trustworthy SOURCE training data attribution.

SOURCE (Bae, Lin, Lorraine, Grosse 2024) approximates unrolled differentiation through training:
segments of the run each get an EK-FAC curvature; a query gradient is walked back through
exp(−c·H) propagation and (I − exp(−c·H))H⁻¹ accumulation operators and scored against
segment-averaged training gradients.

**Sign convention**: a score τ(z_q, z_m) > 0 means removing training example z_m would *raise* the
query measurement f (for f = loss: z_m is a helpful "proponent").

Importing this package loads no compiled code and initialises no device (everything heavy is lazy).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TrainingRun": "source_fast.run",
    "SourceAnalyzer": "source_fast.analyzer",
    "Task": "source_fast.task",
    "sample_labels": "source_fast.task",
    "nll_pair": "source_fast.task",
    "linear_nll_pair": "source_fast.task",
    "ClassificationTask": "source_fast.task",
    "RegressionTask": "source_fast.task",
    "CausalLMTask": "source_fast.task",
    "explain": "source_fast.ops",
}
_SUBMODULES = ("ops", "spectral", "reference", "evaluation", "ekfac", "io", "modules", "diagnostics")

__all__ = ["TrainingRun", "SourceAnalyzer", "Task", "ClassificationTask", "RegressionTask", "CausalLMTask",
           "sample_labels", "nll_pair", "linear_nll_pair", "explain", *_SUBMODULES, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"source_fast.{name}")
    raise AttributeError(f"module 'source_fast' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
