"""Tracked layers' token rows: for every supported module type and convolution setting, Σ_t g_t a_tᵀ over a
single example's rows equals the weight (and bias) gradient autograd computes, in the [O, I] bias-last
layout; and the conv patches equal the dense oracle's independent extraction (Tensor.unfold)."""
import pytest
import torch
from torch import nn

from source_fast.modules import (Capture, conv_patches, find_tracked_layers, gradient_rows, one_channel_group_grads,
                                 supported)
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


ONE_CHANNEL_CONVS = [  # convolutions whose groups each read one input channel: (module, spatial size)
    pytest.param(lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (6, 7), id="depthwise"),
    pytest.param(lambda: nn.Conv2d(3, 6, 3, stride=2, groups=3, bias=False), (7, 7), id="depthwise-multiplier2"),
    pytest.param(lambda: nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (7, 6),
                 id="depthwise-multiplier3-mixed"),
    pytest.param(lambda: nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect", groups=2), (5, 6),
                 id="depthwise-reflect-same"),
    pytest.param(lambda: nn.Conv2d(2, 2, (2, 3), padding=(1, 2), stride=2, padding_mode="circular", groups=2),
                 (6, 5), id="depthwise-circular-strided"),
    pytest.param(lambda: nn.Conv1d(4, 4, 3, padding="same", groups=4, padding_mode="replicate"), (9,),
                 id="conv1d-depthwise-replicate"),
    pytest.param(lambda: nn.Conv1d(2, 4, 4, stride=2, padding=3, dilation=2, groups=2), (11,),
                 id="conv1d-depthwise-dilated"),
    pytest.param(lambda: nn.Conv2d(1, 3, 3, padding=1, stride=2), (6, 6), id="one-input-channel"),
    pytest.param(lambda: nn.Conv1d(1, 2, 2, padding="same"), (7,), id="conv1d-one-input-channel-same-even"),
]


def _gradient(rows_pair):
    a, g = rows_pair
    return torch.bmm(g.transpose(1, 2), a)


@pytest.mark.parametrize("make, spatial", ONE_CHANNEL_CONVS)
def test_gradient_form_rows_give_each_examples_gradient(make, spatial):
    """Capture.rows(gradient_form=True) gives a layer of one input channel (a depthwise group, or a convolution of
    one input channel) as `gradient_rows` (m tokens: G_n's rows against an identity) of `one_channel_group_grads`:
    per example the same Σ_t g aᵀ as its patch rows, and autograd's gradient; `paired_rows` the same for another
    loss of the forward; the covariance passes' form (the default) stays patch rows."""
    torch.manual_seed(0)
    conv = make().double()
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(3, conv.in_channels, *spatial, dtype=torch.float64)
    layers = find_tracked_layers(model, ["0"])
    weights = [torch.randn(3, conv.out_channels, *conv(x).shape[2:], dtype=torch.float64) for _ in range(2)]
    with Capture(layers) as capture:
        out = model(x)
        patch = capture.rows((out * weights[0]).sum(), retain_graph=True)
        patch_paired = capture.paired_rows((out * weights[1]).sum(), patch)
    with Capture(layers) as capture:
        out = model(x)
        formed = capture.rows((out * weights[0]).sum(), retain_graph=True, gradient_form=True)
        formed_paired = capture.paired_rows((out * weights[1]).sum(), formed)
    m = conv.out_channels // conv.groups
    for layer in layers:
        a, g = formed[layer.name]
        assert a.shape == (3, m, layer.in_features) and torch.equal(g, torch.eye(m, dtype=g.dtype).expand(3, m, m))
        assert patch[layer.name][0].shape[1] > 1  # patch rows: one token per output position
        torch.testing.assert_close(_gradient(formed[layer.name]), _gradient(patch[layer.name]), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(_gradient(formed_paired[layer.name]), _gradient(patch_paired[layer.name]),
                                   rtol=1e-12, atol=1e-12)
    model.zero_grad()
    model(x[:1]).mul(weights[0][:1]).sum().backward()
    for layer in layers:
        torch.testing.assert_close(_gradient(formed[layer.name])[0], layer.param_grad(), rtol=1e-12, atol=1e-12)


def test_one_channel_group_grads_of_some_groups_and_bad_shapes():
    """Any subset of the groups, given their channels and their outputs' gradients (what a row cache rebuilds from:
    `rows.expanded_rows`), gives those groups' slices of the whole module's gradients; `gradient_rows` sums back
    to G_n; shapes that are not this convolution's raise naming what was expected."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    gy = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    whole = one_channel_group_grads(conv, x, gy)
    assert whole.shape == (2, 3, 2, 10)
    torch.testing.assert_close(one_channel_group_grads(conv, x[:, 1:2], gy[:, 2:4]), whole[:, 1:2], rtol=0, atol=0)
    rows = gy.reshape(2, 6, 25)[:, [4, 5, 0, 1]]  # groups 2 and 0, as [B, channels·m, positions]
    torch.testing.assert_close(one_channel_group_grads(conv, x[:, [2, 0]], rows), whole[:, [2, 0]], rtol=0, atol=0)
    a, g = gradient_rows(whole[:, 1])
    torch.testing.assert_close(torch.bmm(g.transpose(1, 2), a), whole[:, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="gy must be the output gradient"):
        one_channel_group_grads(conv, x, gy[:, :, :4])
    with pytest.raises(ValueError, match="gy must be the output gradient"):
        one_channel_group_grads(conv, x, gy[:, :5])


def test_float32_and_half_inputs_are_formed_in_float32():
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
    x, gy = torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6)
    want = one_channel_group_grads(conv, x.double(), gy.double())  # the module gives only the geometry
    assert one_channel_group_grads(conv, x, gy).dtype == torch.float32
    half = one_channel_group_grads(conv, x.bfloat16(), gy.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), one_channel_group_grads(conv, x.bfloat16().double(),
                                                                      gy.bfloat16().double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_channel_group_grads(conv, x, gy).double(), want, rtol=1e-5, atol=1e-5)


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


def test_tracked_modules_sharing_a_weight_are_named(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[2].weight = model[0].weight
    with caplog.at_level("WARNING", logger="source_fast"):
        find_tracked_layers(model)
    assert "tracked parameters 0.weight and 2.weight are one tensor (tied weights)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="source_fast"):
        find_tracked_layers(model, ["0", "3"])
    assert "tied" not in caplog.text


def test_trained_parameters_outside_the_tracked_modules_are_logged(caplog):
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with caplog.at_level("INFO", logger="source_fast"):
        find_tracked_layers(model)
    assert "3 trained parameters are in no tracked module (0.weight, 1.weight, 1.bias)" in caplog.text
    caplog.clear()
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    with caplog.at_level("INFO", logger="source_fast"):
        find_tracked_layers(model)
    assert "in no tracked module" not in caplog.text
