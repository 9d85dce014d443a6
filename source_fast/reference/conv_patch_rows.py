"""conv_patch_rows: a Conv1d/Conv2d input [B, C, *spatial] -> activation rows [B, positions, C·prod(kernel) (+1)],
columns in the order of the weight's flattening [O, C, k...], a trailing column of ones when the layer has a bias.

Extracted here by Tensor.unfold per spatial dim (not F.unfold, which the pipeline's torch path uses, nor the
compiled kernel's index arithmetic). Patches are copies, so the result is exact in any dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_patches_one(m, x: torch.Tensor) -> torch.Tensor:
    """One example's conv patches [positions, C·prod(kernel)] (x: [1, C, *spatial]) after padding (the module's
    padding_mode): explicit, "valid", or "same" (the extra position after, as torch's convolution pads an even
    kernel)."""
    k, dil, stride = m.kernel_size, m.dilation, m.stride
    if m.padding == "same":
        pads = [(d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for d, kk in zip(dil, k)]
    elif m.padding == "valid":
        pads = [(0, 0)] * len(k)
    else:
        pads = [(p, p) for p in m.padding]
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode  # reflect, replicate, circular
    x = F.pad(x[0], [p for pair in reversed(pads) for p in pair], mode=mode)  # [C, *spatial]
    for d in range(len(k)):  # window dims appended at the end, one per spatial dim
        x = x.unfold(1 + d, dil[d] * (k[d] - 1) + 1, stride[d])
    x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in dil)]  # [C, *out, *k]
    n = len(k)
    x = x.permute(*range(1, 1 + n), 0, *range(1 + n, 1 + 2 * n))  # [*out, C, *k]
    return x.reshape(-1, x[(0,) * n].numel())


def conv_patch_rows_ref(m, x: torch.Tensor) -> torch.Tensor:
    """m: an nn.Conv1d / nn.Conv2d; x: its input [B, C, *spatial]. Returns [B, positions, I] in x's dtype."""
    rows = torch.stack([conv_patches_one(m, x[b:b + 1]) for b in range(x.shape[0])])
    if m.bias is not None:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
    return rows
