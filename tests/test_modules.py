"""Tracked layers' token rows: for every supported module type and convolution setting, Σ_t g_t a_tᵀ over a
single example's rows equals the weight (and bias) gradient autograd computes, in the [O, I] bias-last
layout; and the conv patches equal the dense oracle's independent extraction (Tensor.unfold)."""
import pytest
import torch
from torch import nn

from source_fast.modules import Capture, conv_patches, find_tracked_layers, supported
from source_fast.reference.conv_patch_rows import conv_patches_one

# torch notes that "same" padding of an even kernel copies the input: true, and beside the point here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

CONVS = [  # (module, spatial size)
    pytest.param(lambda: nn.Conv1d(3, 4, 3), (9,), id="conv1d"),
    pytest.param(lambda: nn.Conv1d(3, 4, 3, padding="same"), (9,), id="conv1d-same"),
    pytest.param(lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2), (10,), id="conv1d-same-even-dilated"),
    pytest.param(lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, bias=False), (11,), id="conv1d-stride-nobias"),
    pytest.param(lambda: nn.Conv1d(2, 5, 2, padding="valid", dilation=3), (8,), id="conv1d-valid"),
    pytest.param(lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), (6, 7), id="conv2d-same-even"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), dilation=(2, 1)), (7, 8), id="conv2d-mixed"),
    pytest.param(lambda: nn.Conv2d(1, 3, 3, padding=1, stride=2), (6, 6), id="conv2d"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 6), id="conv2d-reflect"),
    pytest.param(lambda: nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="replicate"), (5, 6),
                 id="conv2d-replicate-same-even"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(2, 1), padding_mode="circular"), (7, 6),
                 id="conv2d-circular-strided"),
    pytest.param(lambda: nn.Conv1d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"), (9,),
                 id="conv1d-reflect-dilated"),
]


def _rows_and_grads(model, x, names):
    layers = find_tracked_layers(model, names)
    with Capture(layers) as capture:
        out = model(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
        rows = capture.rows(loss, retain_graph=True)
    model.zero_grad()
    loss.backward()
    return layers, rows


@pytest.mark.parametrize("make, spatial", CONVS)
def test_conv_rows_give_the_autograd_gradient(make, spatial):
    torch.manual_seed(0)
    conv = make().double()
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(1, conv.in_channels, *spatial, dtype=torch.float64)
    (layer,), rows = _rows_and_grads(model, x, ["0"])
    a, g = rows["0"]
    assert a.shape[2] == layer.in_features and g.shape[2] == layer.out_features
    torch.testing.assert_close(g[0].T @ a[0], layer.param_grad(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, spatial", CONVS)
def test_conv_patches_match_the_oracles_extraction(make, spatial):
    torch.manual_seed(1)
    conv = make().double()
    x = torch.randn(2, conv.in_channels, *spatial, dtype=torch.float64)
    got = conv_patches(conv, x)
    assert torch.equal(got, torch.stack([conv_patches_one(conv, x[i:i + 1]) for i in range(2)]))
    want = conv(x).reshape(2, conv.out_channels, -1).transpose(1, 2)
    bias = 0 if conv.bias is None else conv.bias
    torch.testing.assert_close(got @ conv.weight.reshape(conv.out_channels, -1).T + bias, want)


@pytest.mark.parametrize("make, spatial", [
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 6), id="conv2d-groups2"),
    pytest.param(lambda: nn.Conv2d(3, 6, 3, stride=2, groups=3, bias=False), (7, 7), id="depthwise-multiplier2"),
    pytest.param(lambda: nn.Conv1d(4, 4, 3, padding="same", groups=4, padding_mode="reflect"), (9,),
                 id="conv1d-depthwise-reflect"),
])
def test_grouped_conv_is_one_layer_per_group_giving_its_slice_of_the_gradient(make, spatial):
    """A grouped convolution is `groups` tracked layers "<name>[k]": group k's rows (its input channels' patches,
    its output channels' g) give rows k·O/G..(k+1)·O/G of autograd's weight (and bias) gradient, and the groups
    together give all of it."""
    torch.manual_seed(0)
    conv = make().double()
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(1, conv.in_channels, *spatial, dtype=torch.float64)
    layers, rows = _rows_and_grads(model, x, ["0"])
    assert [layer.name for layer in layers] == [f"0[{k}]" for k in range(conv.groups)]
    per_group = []
    for layer in layers:
        a, g = rows[layer.name]
        assert a.shape[2] == layer.in_features == conv.in_channels // conv.groups * conv.weight[0, 0].numel() \
            + (conv.bias is not None)
        assert g.shape[2] == layer.out_features == conv.out_channels // conv.groups
        torch.testing.assert_close(g[0].T @ a[0], layer.param_grad(), rtol=1e-12, atol=1e-12)
        assert layer.param_names()["weight"] == "0.weight"
        per_group.append(layer.param_grad())
    whole = conv.weight.grad.reshape(conv.out_channels, -1)
    if conv.bias is not None:
        whole = torch.cat([whole, conv.bias.grad[:, None]], dim=1)
    assert torch.equal(torch.cat(per_group), whole)


def test_linear_with_token_dims_and_hf_conv1d_rows_give_the_autograd_gradient():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), transformers.pytorch_utils.Conv1D(5, 4)).double()
    x = torch.randn(1, 2, 6, 3, dtype=torch.float64)  # tokens over two leading dims
    layers, rows = _rows_and_grads(model, x, ["0", "2"])
    for layer in layers:
        a, g = rows[layer.name]
        torch.testing.assert_close(g[0].T @ a[0], layer.param_grad(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module, why", [
    (nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d is not a supported module type"),
    (nn.Conv3d(1, 1, 1), "Conv3d is not a supported module type (nn.Linear, nn.Conv1d, nn.Conv2d"),
    (nn.Embedding(3, 2), "Embedding is not a supported"),
])
def test_unsupported_modules_say_why(module, why):
    assert why in supported(module)
    with pytest.raises(ValueError, match="tracked module 'm'"):
        find_tracked_layers(nn.ModuleDict({"m": module}), ["m"])
