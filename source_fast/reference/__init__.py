"""Float64 pure-torch oracles, one file per op (same stem as kernels/, tests/ops/, benchmarks/).

Each reference is the simplest correct code, not the fast path: `upcast=True` (default) computes in
float64 (the oracle); `upcast=False` computes in the input dtype (a same-precision baseline for the
low-precision tolerance rule of tests/_tolerances.py).
"""
from .conv_group_grads import conv_group_grads_ref
from .conv_patch_covariance import conv_patch_covariance_ref
from .conv_patch_rows import conv_patch_rows_ref
from .covariance import covariance_ref
from .kron_project import kron_project_ref
from .lambda_accum import lambda_accum_ref
from .rank_one_product import rank_one_product_ref
from .score import (per_example_grads_ref, score_lowrank_ref, score_pairwise_ref, score_per_token_ref,
                    score_self_ref)
from .to_queries_innermost import to_queries_innermost_ref

__all__ = [
    "conv_group_grads_ref",
    "conv_patch_covariance_ref",
    "conv_patch_rows_ref",
    "covariance_ref",
    "kron_project_ref",
    "lambda_accum_ref",
    "rank_one_product_ref",
    "score_pairwise_ref",
    "score_self_ref",
    "per_example_grads_ref",
    "score_lowrank_ref",
    "score_per_token_ref",
    "to_queries_innermost_ref",
]
