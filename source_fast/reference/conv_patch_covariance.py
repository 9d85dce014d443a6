"""conv_patch_covariance: per channel c of a convolution input x [B, C, *spatial], Σ over images and output positions
of r rᵀ, r = channel c's patch of the kernel (and a 1 when the layer has a bias): [C, D, D], D = prod(kernel) (+1).
What the covariance pass needs of a convolution whose groups each read one input channel (a depthwise one).

From the float64 patch rows of each channel alone (`conv_patch_rows_ref`: the independent Tensor.unfold extraction,
which reads only the module's geometry and bias), summed as products in float64."""
from __future__ import annotations

import torch

from .conv_patch_rows import conv_patch_rows_ref


def conv_patch_covariance_ref(m, x: torch.Tensor) -> torch.Tensor:
    """m: an nn.Conv1d / nn.Conv2d (only its geometry and whether it has a bias are used); x: [B, C, *spatial].
    Returns [C, D, D] in float64."""
    out = []
    for c in range(x.shape[1]):
        rows = conv_patch_rows_ref(m, x[:, c:c + 1].double())
        rows = rows.reshape(-1, rows.shape[-1])
        out.append(rows.T @ rows)
    return torch.stack(out)
