"""conv_group_grads: the per-example gradients of a convolution whose groups each read one input channel (a
depthwise convolution with channel multiplier m), from its input x [B, C, *spatial] and output gradient gy
[B, C·m, *out_spatial]: G[b, c, j] = Σ over output positions of gy[b, c·m + j] times channel c's patch row (and a 1
when the layer has a bias): [B, C, m, prod(kernel) (+1)].

From the float64 patch rows of each channel alone (`conv_patch_rows_ref`, the independent Tensor.unfold
extraction), contracted with the output gradient in float64."""
from __future__ import annotations

import torch

from .conv_patch_rows import conv_patch_rows_ref


def conv_group_grads_ref(m, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """m: an nn.Conv1d / nn.Conv2d (only its geometry and whether it has a bias are used); x: [B, C, *spatial]; gy:
    [B, C·m, *out_spatial]. Returns [B, C, m, D] in float64."""
    b, c = x.shape[:2]
    g = gy.double().reshape(b, c, gy.shape[1] // c, -1)  # [B, C, m, positions]
    out = [torch.einsum("bjp,bpk->bjk", g[:, k], conv_patch_rows_ref(m, x[:, k:k + 1].double())) for k in range(c)]
    return torch.stack(out, dim=1)
