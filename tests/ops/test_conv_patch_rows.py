"""csrc/conv_patch_rows (a conv layer's activation rows, bias column included, written in one pass) against the
reference extraction (Tensor.unfold per spatial dim, source_fast/reference/conv_patch_rows.py): the same bits, for
every padding, stride, dilation and input layout the tracked layers accept; and the tracked layers' use of it."""
import pytest
import torch
from torch import nn

from _backends import at_thread_counts
from source_fast import _compiled, _extension, modules
from source_fast.reference import conv_patch_rows_ref

pytestmark = [pytest.mark.usefixtures("_needs_extension"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]



CONVS = [  # (module, input spatial size)
    pytest.param(lambda: nn.Conv1d(3, 4, 3), (9,), id="conv1d"),
    pytest.param(lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2), (10,), id="conv1d-same-even-dilated"),
    pytest.param(lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, bias=False), (11,), id="conv1d-stride-nobias"),
    pytest.param(lambda: nn.Conv2d(3, 16, 3, padding="same"), (32, 32), id="conv2d-3x3-same"),
    pytest.param(lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), (6, 7), id="conv2d-same-even"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), dilation=(2, 1)), (7, 8), id="conv2d-mixed"),
    pytest.param(lambda: nn.Conv2d(1, 3, 5, padding=4, stride=3), (6, 6), id="conv2d-5x5-wide-padding"),
    pytest.param(lambda: nn.Conv2d(2, 2, (1, 7), padding=(0, 3), bias=False), (3, 9), id="conv2d-1x7"),
    pytest.param(lambda: nn.Conv2d(2, 2, 4, dilation=3), (12, 13), id="conv2d-valid-dilated"),
    pytest.param(lambda: nn.Conv2d(3, 2, 3, padding=1), (1, 1), id="conv2d-one-pixel"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 6), id="conv2d-reflect"),
    pytest.param(lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular"), (7,), id="conv1d-circular"),
]


@pytest.mark.parametrize("make, spatial", CONVS)
@pytest.mark.parametrize("layout", ["contiguous", "channel-slice", "channels-last"])
def test_conv_patch_rows_equal_the_reference(make, spatial, layout):
    torch.manual_seed(0)
    conv = make()
    c = conv.in_channels
    if layout == "channel-slice":  # the channels of a wider tensor: batch and channel strides differ
        x = torch.randn(3, c + 2, *spatial)[:, 1:1 + c]
    elif layout == "channels-last":
        x = torch.randn(3, *spatial, c).movedim(-1, 1)
    else:
        x = torch.randn(3, c, *spatial)
    x2, kernel, dilation, stride, pads = modules._conv_geometry(conv, x)
    got = _extension.conv_patch_rows_cpu(x2, kernel, stride, dilation, pads, conv.bias is not None)
    assert torch.equal(got, conv_patch_rows_ref(conv, x))  # copies, zeros and ones: the same bits
    assert torch.equal(modules.conv_patch_rows(conv, x), got)


def test_conv_patch_rows_give_the_layer_output():
    """A basis-free check: rows @ [W, b]ᵀ is the convolution's output."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 11)
    rows = modules.conv_patch_rows(conv, x)
    weight = torch.cat([conv.weight.reshape(5, -1), conv.bias[:, None]], dim=1)
    want = conv(x).reshape(2, 5, -1).transpose(1, 2)
    torch.testing.assert_close(rows @ weight.T, want, rtol=1e-5, atol=1e-5)


def test_conv_patch_rows_bitwise_independent_of_threads():
    conv, x = nn.Conv2d(16, 8, 3, padding=1), torch.randn(64, 16, 16, 16)
    one, two = at_thread_counts(lambda: modules.conv_patch_rows(conv, x))
    assert torch.equal(one, two)


def test_tracked_layers_use_it_on_float32_cpu_and_torch_otherwise(monkeypatch):
    """TrackedLayer.input_rows takes the compiled rows for float32 CPU inputs; float64 inputs, or the compiled
    check disabled, take F.unfold + torch.cat: the same values either way."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    (layer,) = modules.find_tracked_layers(nn.Sequential(conv), ["0"])
    x = torch.randn(2, 3, 8, 8)
    calls = []
    original = _extension.conv_patch_rows_cpu
    monkeypatch.setattr(_extension, "conv_patch_rows_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = layer.input_rows(x)
    assert calls == [1]
    assert torch.equal(layer.input_rows(x.double()), got.double()) and calls == [1]
    monkeypatch.setattr(_compiled, "usable", lambda *a: False)
    assert torch.equal(layer.input_rows(x), got) and calls == [1]


def test_conv_patch_rows_rejects_bad_arguments():
    x = torch.randn(2, 3, 5, 5)
    geometry = ((3, 3), (1, 1), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(TypeError, match="x: the cpu backend accepts float32 only, got torch.float64"):
        _extension.conv_patch_rows_cpu(x.double(), *geometry, True)
    with pytest.raises(ValueError, match=r"x: expected \[B, C, H, W\], got shape \(3, 5, 5\)"):
        _extension.conv_patch_rows_cpu(x[0], *geometry, True)
    with pytest.raises(ValueError, match="x: spatial size 5 x 5 .* smaller than the dilated kernel 7 x 3"):
        _extension.conv_patch_rows_cpu(x, (3, 3), (1, 1), (3, 1), ((0, 0), (0, 0)), True)
    with pytest.raises(ValueError, match="stride: expected >= 1, got 0 x 1"):
        _extension.conv_patch_rows_cpu(x, (3, 3), (0, 1), (1, 1), ((0, 0), (0, 0)), True)


def test_compiled_patch_rows_check_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_passed", {})
    monkeypatch.setattr(modules, "_check_patch_rows", lambda: False)
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match="compiled conv patch rows disagrees with torch"):
        got = modules.conv_patch_rows(conv, x)
    assert torch.equal(got, conv_patch_rows_ref(conv, x))
