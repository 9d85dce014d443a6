"""csrc/conv_group_grads (the per-example gradients of a convolution whose groups each read one input channel, from
its input and output gradient, without patch rows: every use of a depthwise convolution's groups through G_n)
against the float64 reference (source_fast/reference/conv_group_grads.py: each channel's Tensor.unfold patch rows
contracted with the output gradient); the torch path; and the dispatch in modules.one_channel_group_grads."""
import pytest
import torch
from torch import nn

from _backends import at_thread_counts
from _one_channel_convs import LAYOUTS, ONE_CHANNEL_CONVS, layout_tensor
from source_fast import _compiled, _extension, modules
from source_fast.reference import conv_group_grads_ref

pytestmark = [pytest.mark.usefixtures("_needs_extension"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]



@pytest.mark.parametrize("make, spatial", ONE_CHANNEL_CONVS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_group_grads_match_the_reference(make, spatial, layout):
    torch.manual_seed(0)
    conv = make()
    x = layout_tensor((5, conv.in_channels, *spatial), layout)
    with torch.no_grad():
        gy = layout_tensor(conv(x).shape, layout)
    want = conv_group_grads_ref(conv, x, gy)
    x2, kernel, dilation, stride, pads = modules._conv_geometry(conv, x)
    got = _extension.conv_group_grads_cpu(x2, gy.reshape(gy.shape[0], gy.shape[1], -1, gy.shape[-1]), kernel, stride,
                                          dilation, pads, conv.bias is not None)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().amax()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * scale)
    used = modules.one_channel_group_grads(conv, x, gy)  # the kernel or torch, by the number of positions
    flat = modules.one_channel_group_grads(conv, x, gy.reshape(*gy.shape[:2], -1))  # positions flattened
    assert torch.equal(flat, used)
    torch.testing.assert_close(used.double(), want, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(modules.one_channel_group_grads_torch(conv, x.double(), gy.double()), want,
                               rtol=1e-12, atol=1e-12 * scale)


def test_one_channel_group_grads_use_the_kernel_on_float32_cpu_from_enough_positions_and_torch_otherwise(monkeypatch):
    conv, x, gy = nn.Conv2d(3, 3, 3, padding=1, groups=3), torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    calls, original = [], _extension.conv_group_grads_cpu
    monkeypatch.setattr(_extension, "conv_group_grads_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    small = modules.one_channel_group_grads(conv, x, gy)  # 36 positions: torch's convolution is faster there
    assert calls == []
    monkeypatch.setattr(modules, "GROUP_GRADS_MIN_POSITIONS", 36)
    got = modules.one_channel_group_grads(conv, x, gy)
    assert calls == [1]
    torch.testing.assert_close(got, small, rtol=1e-5, atol=1e-5)
    want = modules.one_channel_group_grads(conv, x.double(), gy.double())
    assert want.dtype == torch.float64 and calls == [1]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):  # widened by the torch path, as before
        low = modules.one_channel_group_grads(conv, x.to(dtype), gy.to(dtype))
        assert low.dtype == torch.float32 and calls == [1]
    monkeypatch.setattr(_compiled, "usable", lambda *a: False)
    torch.testing.assert_close(modules.one_channel_group_grads(conv, x, gy), got, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_conv_group_grads_bitwise_independent_of_threads():
    conv, x, gy = nn.Conv2d(8, 16, 3, padding=1, groups=8), torch.randn(37, 8, 24, 24), torch.randn(37, 16, 24, 24)
    assert 24 * 24 >= modules.GROUP_GRADS_MIN_POSITIONS
    one, two = at_thread_counts(lambda: modules.one_channel_group_grads(conv, x, gy))
    assert torch.equal(one, two)


def test_conv_group_grads_reject_bad_arguments():
    x, gy = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    geometry = ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    with pytest.raises(TypeError, match="x: the cpu backend accepts float32 only, got torch.float64"):
        _extension.conv_group_grads_cpu(x.double(), gy, *geometry, True)
    with pytest.raises(TypeError, match="gy: the cpu backend accepts float32 only, got torch.float64"):
        _extension.conv_group_grads_cpu(x, gy.double(), *geometry, True)
    with pytest.raises(ValueError, match=r"gy: expected \[B=2, C·M \(C=3\), OH=5, OW=5\], got \(2, 4, 5, 5\)"):
        _extension.conv_group_grads_cpu(x, torch.randn(2, 4, 5, 5), *geometry, True)
    with pytest.raises(ValueError, match="gy must be the output gradient .* got shape \\(2, 3, 4, 5\\)"):
        modules.one_channel_group_grads(nn.Conv2d(3, 3, 3, padding=1, groups=3), x, torch.randn(2, 3, 4, 5))


def test_compiled_group_grads_check_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_passed", {})
    monkeypatch.setattr(modules, "_check_group_grads", lambda: False)
    monkeypatch.setattr(modules, "GROUP_GRADS_MIN_POSITIONS", 1)
    conv, x, gy = nn.Conv2d(2, 2, 3, groups=2), torch.randn(2, 2, 6, 6), torch.randn(2, 2, 4, 4)
    with pytest.warns(RuntimeWarning, match="compiled conv group grads disagrees with torch"):
        got = modules.one_channel_group_grads(conv, x, gy)
    torch.testing.assert_close(got.double(), conv_group_grads_ref(conv, x, gy), rtol=1e-5, atol=1e-5)
