"""csrc/conv_patch_covariance (per channel, Σ r rᵀ of a convolution's patches and bias 1 over images and output
positions, without writing the patch rows: the covariance pass of a depthwise convolution's groups) against the
float64 reference (source_fast/reference/conv_patch_covariance.py: each channel's Tensor.unfold patch rows); the
torch path; and its use by the covariance pass."""
import pytest
import torch
from torch import nn

from _backends import at_thread_counts
from _one_channel_convs import LAYOUTS, ONE_CHANNEL_CONVS, layout_tensor
from source_fast import _compiled, _extension, modules
from source_fast.reference import conv_patch_covariance_ref

pytestmark = [pytest.mark.usefixtures("_needs_extension"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]



@pytest.mark.parametrize("make, spatial", ONE_CHANNEL_CONVS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_patch_covariance_matches_the_reference(make, spatial, layout):
    torch.manual_seed(0)
    conv = make()
    x = layout_tensor((5, conv.in_channels, *spatial), layout)
    want = conv_patch_covariance_ref(conv, x)
    got = modules.conv_patch_covariance(conv, x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().amax()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * scale)
    assert torch.equal(got, got.transpose(1, 2))
    torch.testing.assert_close(modules.conv_patch_covariance_torch(conv, x.double()), want, rtol=1e-12,
                               atol=1e-12 * scale)


def test_conv_patch_covariance_uses_the_kernel_on_float32_cpu_and_torch_otherwise(monkeypatch):
    conv, x = nn.Conv2d(3, 3, 3, padding=1, groups=3), torch.randn(4, 3, 6, 6)
    calls, original = [], _extension.conv_patch_covariance_cpu
    monkeypatch.setattr(_extension, "conv_patch_covariance_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = modules.conv_patch_covariance(conv, x)
    assert calls == [1]
    want = modules.conv_patch_covariance(conv, x.double())
    assert want.dtype == torch.float64 and calls == [1]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(_compiled, "usable", lambda *a: False)
    torch.testing.assert_close(modules.conv_patch_covariance(conv, x), got, rtol=1e-5, atol=1e-4)
    assert calls == [1]


def test_16_bit_inputs_are_summed_in_float32():
    """A bf16/fp16 layer input is widened before the products (as ops.covariance accumulates 16-bit rows in fp32):
    the sums of the rounded values, not of bf16 products."""
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    x = torch.randn(6, 3, 9, 9)
    for dtype in (torch.bfloat16, torch.float16):
        got = modules.conv_patch_covariance(conv, x.to(dtype))
        want = conv_patch_covariance_ref(conv, x.to(dtype).double())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_conv_patch_covariance_bitwise_independent_of_threads():
    conv, x = nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(37, 8, 16, 16)
    one, two = at_thread_counts(lambda: modules.conv_patch_covariance(conv, x))
    assert torch.equal(one, two)


def test_conv_patch_covariance_rejects_bad_arguments():
    x = torch.randn(2, 3, 5, 5)
    geometry = ((3, 3), (1, 1), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(TypeError, match="x: the cpu backend accepts float32 only, got torch.float64"):
        _extension.conv_patch_covariance_cpu(x.double(), *geometry, True)
    with pytest.raises(ValueError, match=r"x: expected \[B, C, H, W\], got shape \(3, 5, 5\)"):
        _extension.conv_patch_covariance_cpu(x[0], *geometry, True)
    with pytest.raises(ValueError, match="x: spatial size 5 x 5 .* smaller than the dilated kernel 7 x 3"):
        _extension.conv_patch_covariance_cpu(x, (3, 3), (1, 1), (3, 1), ((0, 0), (0, 0)), True)
    with pytest.raises(ValueError, match="dilation: expected >= 1, got 0 x 1"):
        _extension.conv_patch_covariance_cpu(x, (3, 3), (1, 1), (0, 1), ((0, 0), (0, 0)), True)


def test_compiled_patch_covariance_check_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_passed", {})
    monkeypatch.setattr(modules, "_check_patch_covariance", lambda: False)
    conv, x = nn.Conv2d(2, 2, 3, groups=2), torch.randn(2, 2, 6, 6)
    with pytest.warns(RuntimeWarning, match="compiled conv patch covariance disagrees with torch"):
        got = modules.conv_patch_covariance(conv, x)
    torch.testing.assert_close(got.double(), conv_patch_covariance_ref(conv, x), rtol=1e-5, atol=1e-4)


def _depthwise_factors(tmp_path, monkeypatch, form: bool):
    """Influence factors of a float32 CNN with a depthwise layer (and a first conv of 3 input channels), fitted with
    the one-channel forms on or off: {key: tensor} of every stored covariance (A, S)."""
    import source_fast as sf
    from source_fast import io

    if not form:
        monkeypatch.setattr(modules.Capture, "_one_channel_forms_apply", lambda *a: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
    data = torch.utils.data.TensorDataset(torch.randn(20, 3, 6, 6), torch.randint(0, 3, (20,)))
    run = sf.TrainingRun([model.state_dict()], [1], lr=0.1, num_segments=1)
    analyzer = sf.SourceAnalyzer(model, sf.ClassificationTask(), run, output_dir=tmp_path / str(form),
                                 method="influence", batch_size=7, progress=False)
    analyzer.fit(data)
    out = {}
    for path in sorted((tmp_path / str(form)).rglob("covariance_*.safetensors")):
        tensors, _ = io.load_tensors(path)
        out.update({f"{path.name}:{key}": t for key, t in tensors.items()})
    return out


def test_the_fit_takes_depthwise_covariances_from_the_layer_input(tmp_path, monkeypatch):
    """The covariance pass gives a depthwise layer's groups their A from the layer's input (one
    conv_patch_covariance call per batch): the stored covariances equal those of the patch-row path (both
    float32). (The float64 oracle tests of tests/test_end_to_end.py check the whole pipeline through this path.)"""
    calls, original = [], modules.conv_patch_covariance
    monkeypatch.setattr(modules, "conv_patch_covariance", lambda *a: calls.append(a[1].shape) or original(*a))
    formed = _depthwise_factors(tmp_path, monkeypatch, True)
    assert calls == [(7, 4, 6, 6), (7, 4, 6, 6), (6, 4, 6, 6)]  # the depthwise layer, every group at once
    rows = _depthwise_factors(tmp_path, monkeypatch, False)
    assert formed.keys() == rows.keys() and len(formed) == 12 and len(calls) == 3  # A, S of 1 + 4 + 1 layers
    for key, want in rows.items():
        torch.testing.assert_close(formed[key], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=key)
