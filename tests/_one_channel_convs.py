"""Convolutions whose groups each read one input channel (depthwise ones, with channel multipliers; a convolution
of one input channel), in the geometries the kernels that read such a layer's input must handle, and their inputs
in three layouts: shared by tests/ops/test_conv_patch_covariance.py and tests/ops/test_conv_group_grads.py."""
import pytest
import torch
from torch import nn

ONE_CHANNEL_CONVS = [  # (module, input spatial size)
    pytest.param(lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (32, 32), id="depthwise-3x3-same"),
    pytest.param(lambda: nn.Conv2d(4, 8, 3, stride=2, groups=4, bias=False), (9, 8), id="multiplier-2-strided-nobias"),
    pytest.param(lambda: nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (7, 6),
                 id="multiplier-3-mixed"),
    pytest.param(lambda: nn.Conv2d(2, 2, 7, padding=3, groups=2), (11, 13), id="depthwise-7x7"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, padding=2, dilation=2, groups=2), (9, 8), id="depthwise-dilated"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, padding=1, groups=2), (70, 90), id="depthwise-several-blocks"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, stride=(2, 1), padding=1, groups=2), (70, 90),
                 id="row-stride-2-several-blocks"),
    pytest.param(lambda: nn.Conv2d(1, 3, 5, padding=4, stride=3), (6, 6), id="one-channel-5x5-wide-padding"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, padding=1, groups=2), (1, 1), id="one-pixel"),
    pytest.param(lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"), (5, 6), id="reflect"),
    pytest.param(lambda: nn.Conv1d(4, 4, 4, padding="same", groups=4, padding_mode="circular"), (7,),
                 id="conv1d-circular-same-even"),
    pytest.param(lambda: nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=2, groups=3), (41,), id="conv1d-dilated"),
]
LAYOUTS = ["contiguous", "channel-slice", "channels-last"]


def layout_tensor(shape, layout: str) -> torch.Tensor:
    """A random tensor of `shape` [B, C, *spatial] laid out as `layout`: contiguous, the channels of a wider tensor
    (batch and channel strides differ), or channels innermost."""
    b, c, *spatial = shape
    if layout == "channel-slice":
        return torch.randn(b, c + 2, *spatial)[:, 1:1 + c]
    if layout == "channels-last":
        return torch.randn(b, *spatial, c).movedim(-1, 1)
    return torch.randn(b, c, *spatial)
