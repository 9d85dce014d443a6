"""Tracked layers: turning module inputs and output gradients into token rows.

Every supported layer is seen as a matrix W ∈ R^{O×I} acting on token rows a ∈ R^I (bias folded
in as a trailing column of ones), with output pseudo-gradients g ∈ R^O; a per-example gradient is
G_n = Σ_t g_{n,t} a_{n,t}ᵀ in this "[O, I], bias last" layout.

- nn.Linear: any leading dims; dims after the batch are tokens.
- nn.Conv1d / nn.Conv2d (any padding_mode, explicit or "valid"/"same"): unfolded patches are tokens
  (output positions as tokens); the weight [O, C, k...] flattens to [O, C·k...] in unfold's order. A grouped
  convolution (groups = G) is G layers "<name>[k]", each its own [O/G, C/G·k... (+1)] matrix.
- transformers' Conv1D (GPT-2): y = x W + b with W stored [I, O]; same rows as Linear.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import _compiled, _config, _extension

log = logging.getLogger("source_fast")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Matched by name so transformers stays optional.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


_SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, transformers Conv1D"


def supported(module: nn.Module) -> str | None:
    """Why `module` cannot be tracked, or None when it can."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(module):
        return None
    return f"{type(module).__name__} is not a supported module type ({_SUPPORTED})"


def _conv_padding(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per spatial dim: explicit, "valid" or "same" (which pads kernel − 1
    dilated positions per dim, the extra one after, as torch's convolution does for an even kernel)."""
    if module.padding == "valid":
        return tuple((0, 0) for _ in module.kernel_size)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in module.padding)


def _conv_geometry(module: nn.Module, x: torch.Tensor):
    """A Conv1d/Conv2d input as a 2-D one: (x [B, C, H, W], kernel, dilation, stride, ((top, bottom), (left,
    right)) zero padding); a Conv1d is a Conv2d of height 1. A padding_mode other than zeros is applied to x here,
    as torch's convolution does before it convolves without padding."""
    pads = _conv_padding(module)
    if module.padding_mode != "zeros":
        x = F.pad(x, [p for before_after in reversed(pads) for p in before_after], mode=module.padding_mode)
        pads = tuple((0, 0) for _ in pads)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:
        x, kernel, dilation, stride = x.unsqueeze(2), (1,) + kernel, (1,) + dilation, (1,) + stride
        pads = ((0, 0),) + pads
    return x, kernel, dilation, stride, pads


def _symmetric_padding(x: torch.Tensor, pads) -> tuple[torch.Tensor, tuple[int, int]]:
    """(x, padding) for an op that pads both sides alike (F.unfold, F.conv2d): uneven zero padding (an even
    kernel's "same") applied to x first, else left to the op (no padded copy)."""
    if any(before != after for before, after in pads):
        return F.pad(x, [p for before_after in reversed(pads) for p in before_after]), (0, 0)
    return x, tuple(before for before, _ in pads)


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv1d/Conv2d input [B, C, *spatial] -> patch rows [B, positions, C·prod(kernel)] in the order of the
    weight's flattening [O, C, k...] (torch's F.unfold on a 2-D view, after any asymmetric padding)."""
    x, kernel, dilation, stride, pads = _conv_geometry(module, x)
    x, padding = _symmetric_padding(x, pads)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def with_bias_column(rows: torch.Tensor) -> torch.Tensor:
    """Token rows [B, T, D] -> [B, T, D + 1], the last column ones (the bias folded into the weight matrix)."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)


def conv_patch_rows_torch(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv_patch_rows` by torch: F.unfold's patches (`conv_patches`) and, with a bias, a column of ones."""
    rows = conv_patches(module, x)
    return with_bias_column(rows) if getattr(module, "bias", None) is not None else rows


def conv_patch_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv layer's activation rows [B, positions, I]: `conv_patches` and, with a bias, a column of ones. On
    float32 CPU inputs csrc/conv_patch_rows writes them in one pass (its check passed: `_compiled.usable`):
    ≈ 4-7× less time than F.unfold + torch.cat for 128 CIFAR-sized images on a 2-core Zen 4 host."""
    if _compiled.usable("conv patch rows", _check_patch_rows, x):
        x2, kernel, dilation, stride, pads = _conv_geometry(module, x)
        return _extension.conv_patch_rows_cpu(x2, kernel, stride, dilation, pads,
                                              getattr(module, "bias", None) is not None)
    return conv_patch_rows_torch(module, x)


def _check_conv_kernel(kernel, torch_form, same, groups_of_one: bool) -> bool:
    """A compiled kernel of a convolution input against its torch form, compared by `same(got, want)`, on a strided,
    padded, dilated Conv2d of a channel slice and a "same" Conv1d (convolutions whose groups read one channel each
    with `groups_of_one`)."""
    gen = torch.Generator().manual_seed(0)
    cases = ((nn.Conv2d(3, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3 if groups_of_one else 1),
              torch.randn(5, 5, 7, 6, generator=gen)[:, 1:4]),
             (nn.Conv1d(2, 2, 4, padding="same", groups=2 if groups_of_one else 1, bias=not groups_of_one),
              torch.randn(3, 2, 9, generator=gen)))
    ok = True
    for conv, x in cases:
        x2, kernel_size, dilation, stride, pads = _conv_geometry(conv, x)
        ok = ok and same(kernel(x2, kernel_size, stride, dilation, pads, conv.bias is not None), torch_form(conv, x))
    return ok


def _check_patch_rows() -> bool:
    """The compiled patch rows equal the torch path's (the same bits)."""
    return _check_conv_kernel(_extension.conv_patch_rows_cpu, conv_patch_rows_torch, torch.equal, False)


def conv_patch_covariance_torch(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv_patch_covariance` by torch: every channel's patch rows (F.unfold) and their product, in x's dtype."""
    patches = conv_patches(module, x)  # [B, positions, C·K]
    n, positions, width = patches.shape
    c = x.shape[1]
    rows = patches.reshape(n * positions, c, width // c).transpose(0, 1)  # [C, rows, K]
    if getattr(module, "bias", None) is not None:
        rows = with_bias_column(rows)
    return rows.transpose(1, 2) @ rows


def conv_patch_covariance(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per channel c of x [B, C, *spatial]: Σ over images and output positions of r rᵀ, r = channel c's patch of the
    module's kernel (+ a 1 for the bias): [C, D, D], the activation covariance sums of a convolution's groups that
    read one input channel each (a depthwise convolution's), without their patch rows (D = prod(kernel) + 1 values
    per input value). In float32 or wider: 16-bit inputs are widened first, as the covariance op accumulates them.
    On float32 CPU inputs csrc/conv_patch_covariance (its check passed: `_compiled.usable`), else torch
    (`conv_patch_covariance_torch`)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if _compiled.usable("conv patch covariance", _check_patch_covariance, x):
        if x.stride(-1) != 1:  # channels-last: one copy first is faster than the kernel's per-block gathers
            x = x.contiguous()  # (32 ch 32×32, 128 images: 2.2 ms copy + 5.4 against 10.8 ms, host B)
        x2, kernel, dilation, stride, pads = _conv_geometry(module, x)
        return _extension.conv_patch_covariance_cpu(x2, kernel, stride, dilation, pads,
                                                    getattr(module, "bias", None) is not None)
    return conv_patch_covariance_torch(module, x)


def _check_patch_covariance() -> bool:
    """The compiled covariances match the torch path's in float64."""
    return _check_conv_kernel(_extension.conv_patch_covariance_cpu,
                              lambda conv, x: conv_patch_covariance_torch(conv, x.double()),
                              lambda got, want: torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), True)


class Rebuilt:
    """A layer's activation rows kept as what makes them: a conv layer's module input (C·H·W values per example)
    instead of its patch rows (positions × C·k², 9× more for a 3×3 "same" conv), rebuilt by `rows()` when used
    (csrc/conv_patch_rows: ≈ 1 ms per 128 CIFAR-sized images, far less than the model pass that recomputing
    rows which did not fit the row cache costs). module: the convolution when the layer reads one input channel
    (a depthwise group): the covariance pass then takes its covariance from the source (`conv_patch_covariance`)
    and `rows.expanded_rows` its per-example gradients (`one_channel_group_grads`), neither building the rows."""

    __slots__ = ("make", "source", "module")

    def __init__(self, make, source: torch.Tensor, module=None):
        self.make, self.source, self.module = make, source, module

    @property
    def nbytes(self) -> int:
        return self.source.numel() * self.source.element_size()

    def rows(self) -> torch.Tensor:
        return self.make(self.source)


# csrc/conv_group_grads against torch's grouped convolution (128 images, 3×3 depthwise, 2 threads, Zen 5): 7.1× at
# 32×32 output positions (1.38 against 9.84 ms; channels-last 2.9×), 0.9× at 16×16, 0.3× at 8×8 (per-image
# overheads of the kernel; torch's convolution is fast with small kernels).
GROUP_GRADS_MIN_POSITIONS = 512


def one_channel_group_grads(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Per-example gradients G [B, C, m, prod(kernel) (+1 bias column)] of a Conv1d/Conv2d whose groups each read one
    input channel (a depthwise convolution with channel multiplier m; or C = 1, a convolution of one input channel),
    from those groups' input channels x [B, C, *spatial] and their outputs' gradient gy [B, C·m, *out_spatial] (or
    [B, C·m, positions]): G[n, c, j, k] = Σ_p gy[n, c·m + j, p] · x[n, c, p·stride + k·dilation]. No patch rows:
    they hold prod(kernel) + 1 values per input value (forming G from them took 3.5x as long for 128 images of
    32×32, host B). Accumulates in float32 or wider. On float32 CPU inputs of at least GROUP_GRADS_MIN_POSITIONS
    output positions csrc/conv_group_grads (its check passed: `_compiled.usable`), else torch
    (`one_channel_group_grads_torch`)."""
    x2, kernel, dilation, stride, pads = _conv_geometry(module, x)
    out_hw = [(size + before + after - d * (k - 1) - 1) // s + 1
              for size, (before, after), k, d, s in zip(x2.shape[2:], pads, kernel, dilation, stride)]
    n, c = x2.shape[:2]
    if gy.shape[0] != n or gy.shape[1] % c or gy[0, 0].numel() != out_hw[0] * out_hw[1]:
        raise ValueError(f"gy must be the output gradient [B={n}, C·m, *out_spatial] of this convolution's "
                         f"{c} groups ({out_hw[0] * out_hw[1]} output positions), got shape {tuple(gy.shape)}")
    if (x.dtype == gy.dtype == torch.float32 and out_hw[0] * out_hw[1] >= GROUP_GRADS_MIN_POSITIONS
            and _compiled.usable("conv group grads", _check_group_grads, x, gy)):
        if x2.stride(-1) != 1:  # channels-last: one copy first, as for conv_patch_covariance (strided gathers)
            x2 = x2.contiguous()
        return _extension.conv_group_grads_cpu(x2, gy.reshape(n, gy.shape[1], *out_hw), kernel, stride, dilation,
                                               pads, getattr(module, "bias", None) is not None)
    return one_channel_group_grads_torch(module, x, gy)


def one_channel_group_grads_torch(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """`one_channel_group_grads` by torch: one convolution of every (example, channel) image with its own output
    gradient as the kernel (groups = B·C·m; the module's stride is that convolution's dilation and vice versa)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x2, kernel, dilation, stride, pads = _conv_geometry(module, x.to(dt))
    x2, padding = _symmetric_padding(x2, pads)
    n, c = x2.shape[:2]
    out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, p, k, d, s in zip(x2.shape[2:], padding, kernel, dilation, stride)]
    m = gy.shape[1] // c
    kernels = gy.to(dt).reshape(n * c * m, 1, *out_hw)
    images = x2.reshape(1, n * c, *x2.shape[2:])
    if m > 1:  # one group per (example, channel, output): torch's depthwise path, faster than m outputs per group
        images = images.repeat_interleave(m, dim=1)
    grads = F.conv2d(images, kernels, stride=dilation, dilation=stride, padding=padding, groups=n * c * m)
    grads = grads[0, :, :kernel[0], :kernel[1]].reshape(n, c, m, kernel[0] * kernel[1])
    if getattr(module, "bias", None) is not None:
        grads = torch.cat([grads, gy.to(dt).reshape(n, c, m, -1).sum(3, keepdim=True)], dim=3)
    return grads


def _check_group_grads() -> bool:
    """The compiled per-example gradients match the torch path's in float64 (a strided, padded, dilated Conv2d of a
    channel slice with two outputs per channel; a "same" Conv1d with an even kernel and no bias)."""
    gen = torch.Generator().manual_seed(0)
    cases = ((nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3),
              torch.randn(5, 5, 7, 6, generator=gen)[:, 1:4]),
             (nn.Conv1d(2, 2, 4, padding="same", groups=2, bias=False), torch.randn(3, 2, 9, generator=gen)))
    for conv, x in cases:
        with torch.no_grad():
            gy = torch.randn(conv(x).shape, generator=gen)
        x2, kernel, dilation, stride, pads = _conv_geometry(conv, x)
        gy2 = gy.reshape(gy.shape[0], gy.shape[1], -1, gy.shape[-1])
        got = _extension.conv_group_grads_cpu(x2, gy2, kernel, stride, dilation, pads, conv.bias is not None)
        want = one_channel_group_grads_torch(conv, x.double(), gy.double())
        if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5):
            return False
    return True


def gradient_rows(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients G_n [B, O, I] as token rows (a, g) with Σ_t g_t a_tᵀ = G_n: O tokens, a_t = row t of
    G_n and g_t = e_t (an identity per example). Exact for every use of rows that goes through G_n (eigenvalue
    correction, scoring, query gradients, self-influence), not for the covariances A = Σ a aᵀ, S = Σ g gᵀ."""
    n, o, _ = grads.shape
    return grads, torch.eye(o, dtype=grads.dtype, device=grads.device).expand(n, o, o).contiguous()


@dataclass
class TrackedLayer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" (nn.Conv1d / nn.Conv2d) | "hf_conv1d" (transformers' Conv1D, W stored [I, O])
    # A grouped convolution is `groups` independent convolutions, one tracked layer each (its own EK-FAC block):
    # group k maps input channels [k·C/G, (k+1)·C/G) to output channels [k·O/G, (k+1)·O/G).
    group: int = 0
    groups: int = 1
    module_name: str = ""  # the module's name in the model (the layer's own name, but for a group)
    # The examples' dim of the module's input and output: 1 for the Linears of torch's sequence-first
    # (batch_first=False) transformer layers, which see [T, B, ·]; rows are always [B, T, ·].
    batch_dim: int = 0

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def in_features(self) -> int:
        """I, including the bias column."""
        w = self.module.weight
        base = w.shape[0] if self.kind == "hf_conv1d" else w[0].numel()
        return base + int(self.has_bias)

    @property
    def out_features(self) -> int:
        w = self.module.weight
        return w.shape[1] if self.kind == "hf_conv1d" else w.shape[0] // self.groups

    @property
    def reads_one_channel(self) -> bool:
        """A conv layer (or group) of one input channel: per-example gradients by `one_channel_group_grads`."""
        return self.kind == "conv" and self.module.in_channels // self.groups == 1

    def _outputs(self) -> slice:
        """This layer's output channels (all of them but for a group of a grouped convolution)."""
        return slice(self.group * self.out_features, (self.group + 1) * self.out_features)

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the module input this layer reads: a group's input channels, or all of x."""
        if self.groups == 1:
            return x
        per_group = x.shape[1] // self.groups
        return x[:, self.group * per_group:(self.group + 1) * per_group]

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Module input -> activation rows [B, T, I] (bias column appended)."""
        if self.kind == "conv":
            return conv_patch_rows(self.module, self.layer_input(x))
        x = self._batch_first(x)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return with_bias_column(rows) if self.has_bias else rows

    def _batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, self.batch_dim) if self.batch_dim and x.dim() > 2 else x

    def output_rows(self, gy: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the module output -> rows [B, T, O]."""
        if self.kind == "conv":
            gy = gy[:, self._outputs()] if self.groups > 1 else gy
            return gy.reshape(gy.shape[0], gy.shape[1], -1).transpose(1, 2)
        gy = self._batch_first(gy)
        return gy.reshape(gy.shape[0], -1, gy.shape[-1])

    def param_grad(self) -> torch.Tensor:
        """The module's accumulated .grad in the [O, I] bias-last layout (used by oracles and tests)."""
        return self.to_matrix(self.module.weight.grad, self.module.bias.grad if self.has_bias else None)

    def parameters_as_matrix(self) -> torch.Tensor:
        return self.to_matrix(self.module.weight.detach(), self.module.bias.detach() if self.has_bias else None)

    def param_names(self) -> dict[str, str]:
        """Parameter full names ('weight'/'bias' -> state_dict key)."""
        module_name = self.module_name or self.name
        names = {"weight": f"{module_name}.weight"}
        if self.has_bias:
            names["bias"] = f"{module_name}.bias"
        return names

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Any per-parameter tensor (e.g. Adam's v̂) in the [O, I] bias-last layout (this group's rows)."""
        w = weight.T if self.kind == "hf_conv1d" else weight
        w = w.reshape(w.shape[0], -1)
        if self.groups > 1:
            w, bias = w[self._outputs()], None if bias is None else bias[self._outputs()]
        if bias is not None:
            w = torch.cat([w, bias[:, None]], dim=1)
        return w


def _never_called(model: nn.Module) -> dict[int, str]:
    """Supported modules whose forward torch never calls, by id, with the reason: nn.MultiheadAttention reads its
    `out_proj`'s weight and bias in F.multi_head_attention_forward (no hook of the module ever fires)."""
    return {id(m.out_proj): "nn.MultiheadAttention uses its out_proj's weight directly and never calls the module "
            "(no forward hook fires), so it cannot be tracked" for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)}


def _sequence_first(model: nn.Module) -> set[int]:
    """Ids of the modules inside torch's transformer layers built with batch_first=False: their inputs and outputs
    are [T, B, ·] (tokens first)."""
    found = set()
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
                and not getattr(getattr(m, "self_attn", None), "batch_first", True):
            found |= {id(sub) for sub in m.modules() if sub is not m}
    return found


def find_tracked_layers(model: nn.Module, names: list[str] | None = None) -> list[TrackedLayer]:
    """Tracked layers of `model`: the named ones (each must be supported) or every supported one that trained (with a
    parameter that requires grad, when some are frozen; see `_trained`) but those whose forward is never called
    (nn.MultiheadAttention's out_proj)."""
    layers = []
    modules = dict(model.named_modules())
    never_called = _never_called(model)
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"get_influence_tracked_modules() must return a list of module names, got {names!r}")
        for name in names:
            if name not in modules:
                raise ValueError(f"tracked module {name!r} (from get_influence_tracked_modules) is not in the model; "
                                 f"available: {sorted(k for k in modules if k)[:20]}")
            why = supported(modules[name]) or never_called.get(id(modules[name]))
            if why:
                raise ValueError(f"tracked module {name!r}: {why}")
        selected = [(n, modules[n]) for n in names]
    else:
        selected = [(n, m) for n, m in model.named_modules()
                    if n and supported(m) is None and id(m) not in never_called]
        selected = _trained(selected)
    sequence_first = _sequence_first(model)
    for name, module in selected:
        kind = "linear" if isinstance(module, nn.Linear) else "conv" if isinstance(module, (nn.Conv1d, nn.Conv2d)) \
            else "hf_conv1d"
        groups = getattr(module, "groups", 1) if kind == "conv" else 1
        if groups == 1:
            layers.append(TrackedLayer(name, module, kind, module_name=name,
                                       batch_dim=int(kind != "conv" and id(module) in sequence_first)))
        else:  # one layer per group, named "<module>[k]"
            layers += [TrackedLayer(f"{name}[{k}]", module, kind, group=k, groups=groups, module_name=name)
                       for k in range(groups)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no supported modules to track ({_SUPPORTED})")
    _warn_tied(selected)
    _log_untracked(model, selected)
    return layers


def _log_untracked(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> None:
    """Say which trained parameters no tracked module holds (embeddings, normalisation layers, PEFT's embedding
    adapters and DoRA magnitudes): their gradients are not part of the scores, as in Kronfluence and Bergson."""
    tracked = {id(p) for _, m in selected for p in m.parameters(recurse=False)}
    untracked = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in tracked]
    if untracked:
        log.info(
            "source_fast: %d trained parameters are in no tracked module (%s%s): their gradients are not part of the "
            "scores", len(untracked), ", ".join(untracked[:4]), ", …" if len(untracked) > 4 else "")


def _trained(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Of the supported modules, those with a parameter that requires grad, when the model has both kinds: a frozen
    module did not move in training (a frozen backbone, LoRA's base layers), so nothing flows through it to the
    final parameters and its gradients would only add terms to the scores. A model frozen as a whole (set up for
    inference) keeps every module."""
    trained = [(n, m) for n, m in selected if any(p.requires_grad for p in m.parameters(recurse=False))]
    if trained and len(trained) < len(selected):
        kept = {n for n, _ in trained}
        frozen = [n for n, _ in selected if n not in kept]
        log.info(
            "source_fast: tracking the %d supported modules with parameters that require grad; left out %d frozen "
            "ones (%s%s); name the modules in the task's get_influence_tracked_modules() to choose", len(trained),
            len(frozen), ", ".join(frozen[:4]), ", …" if len(frozen) > 4 else "")
        return trained
    return selected


def _warn_tied(selected: list[tuple[str, nn.Module]]) -> None:
    """Tracked modules that share a Parameter (weights tied between two layers) are two layers to source_fast: two
    EK-FAC blocks whose gradients are not summed (Kronfluence does the same). Say so once per pair."""
    owners: dict[int, str] = {}
    for name, module in selected:
        for pname, param in module.named_parameters(recurse=False):
            first = owners.setdefault(id(param), f"{name}.{pname}")
            if first != f"{name}.{pname}":
                log.warning(
                    "source_fast: tracked parameters %s and %s are one tensor (tied weights): each module is its own "
                    "layer with its own EK-FAC block, and their gradients are not summed; track one of them to "
                    "attribute through that use only", first, f"{name}.{pname}")


class OutputChangedInPlace(RuntimeError):
    """The forward changed a tracked module's output in place; its module now hands the model a copy: run the batch's
    forward again (`Capture.rows` raises it on the first batch that shows it, once per module)."""


class Capture:
    """Forward hooks that keep each tracked layer's input rows and output tensor, so that
    `grads(loss)` yields per-layer (a [B,T,I], g [B,T,O]) token rows for one batch.

    A module called more than once in a forward (shared weights: a loop over time steps, a siamese encoder) gets
    the tokens of all its calls, in call order, as one layer's rows: its weight gradient is the sum over calls, so
    G_n = Σ_calls Σ_t g aᵀ, and every call's tokens enter its covariances (Kronfluence's has_shared_parameters).
    Every call must keep the batch's examples along dim 0. A call whose output the loss does not depend on (the model
    uses it detached: PEFT's DoRA runs its adapters on an identity matrix for a detached weight norm) adds nothing to
    the gradient and is no call of the layer's; a module none of whose calls reach the loss keeps zero gradients."""

    def __init__(self, layers: list[TrackedLayer], copied: set[int] | None = None):
        self.layers = layers
        self._inputs: dict[str, list[torch.Tensor]] = {}  # per layer, each call's input (one per module call)
        self._outputs: dict[str, list[tuple[torch.Tensor, int]]] = {}  # each call's output and its version
        self._windows: dict[str, tuple[int, int] | None] = {}
        self._sources: dict[str, tuple] = {}
        self._gradient_form: set[str] = set()  # layers whose last rows are `gradient_rows`
        self._unused: dict[str, set[int]] = {}  # per layer, its calls whose output the last loss did not reach
        self._handles = []
        self._in_backward = False
        # ids of modules whose output the model gets a copy of (changed in place); shared between passes
        self._copied: set[int] = copied if copied is not None else set()

    def __enter__(self):
        members: dict[int, list[TrackedLayer]] = {}  # a grouped convolution's layers share one module: one hook
        for layer in self.layers:
            members.setdefault(id(layer.module), []).append(layer)
        for group in members.values():
            self._handles.append(group[0].module.register_forward_hook(self._hook(group)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def _hook(self, layers: list[TrackedLayer]):
        def hook(module, inputs, output):
            if self._in_backward:  # activation checkpointing recomputes the forward inside the backward
                return None
            x = inputs[0].detach()
            for layer in layers:
                self._inputs.setdefault(layer.name, []).append(x)
                self._outputs.setdefault(layer.name, []).append((output, output._version))
            # An output the model then changes in place (nn.ReLU(inplace=True) right after the layer) is no longer
            # the layer's output to autograd: the model gets a copy instead (`_check_versions` marks such modules).
            return output.clone() if id(module) in self._copied else None
        return hook

    def _check_versions(self) -> None:
        """Raise `OutputChangedInPlace` naming the modules whose captured output the forward changed in place (its
        gradient would be that of the in-place op's result: with a ReLU, masked), after marking them so that the
        next forward hands the model a copy of their output."""
        changed = {layer.module_name or layer.name: layer.module for layer in self.layers
                   if any(out._version != version for out, version in self._outputs.get(layer.name, ()))}
        again = sorted(name for name, m in changed.items() if id(m) in self._copied)
        if again:  # its original output changed although the model got a copy: something else holds it
            raise RuntimeError(f"the outputs of tracked modules {again} are changed in place after the forward even "
                               f"though the model gets copies of them: their gradients cannot be read")
        if changed:
            self._copied |= {id(m) for m in changed.values()}
            raise OutputChangedInPlace(f"outputs of {sorted(changed)} changed in place by the forward")

    def calls(self, name: str) -> int:
        """How many calls of the layer's module in the current forward reach the loss (see the class doc)."""
        return len(self._used(name, self._inputs.get(name, [])))

    def _used(self, name: str, per_call: list) -> list:
        """The entries of `per_call` (one per module call) of the calls that reach the loss."""
        unused = self._unused.get(name)
        return [x for i, x in enumerate(per_call) if i not in unused] if unused else per_call

    def _single_input(self, layer: TrackedLayer) -> torch.Tensor | None:
        """The module input of a layer called once (None otherwise): what the conv forms are built from."""
        xs = self._used(layer.name, self._inputs.get(layer.name, []))
        return xs[0] if len(xs) == 1 else None

    def _joined_calls(self, layer: TrackedLayer, rows: list[torch.Tensor]) -> torch.Tensor:
        """One layer's rows [B, T, ·] of each module call joined along the tokens."""
        if len(rows) == 1:
            return rows[0]
        sizes = [r.shape[0] for r in rows]
        if len(set(sizes)) != 1:
            raise ValueError(f"tracked module {layer.module_name or layer.name!r} was called {len(rows)} times in "
                             f"one forward with batch sizes {sizes} along dim 0: a module called more than once "
                             f"must see the batch's examples along dim 0 in every call")
        return torch.cat(rows, 1)

    def clear(self):
        self._inputs.clear()
        self._outputs.clear()
        self._windows.clear()
        self._sources.clear()
        self._gradient_form = set()
        self._unused = {}

    def activations(self, layer: TrackedLayer, mask: torch.Tensor | None = None) -> torch.Tensor:
        if layer.name not in self._inputs:
            raise RuntimeError(f"tracked module {layer.name!r} was not called in the forward pass")
        rows = [layer.input_rows(x) for x in self._used(layer.name, self._inputs[layer.name])]
        if mask is not None:  # per call: a mask applies to the calls whose tokens are its tokens
            rows = [apply_mask(r, mask, layer.name) for r in rows]
        return self._joined_calls(layer, rows)

    def _gradient_rows_of(self, layer: TrackedLayer, raw: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """The layer's output-gradient rows [B, T, O], every call's tokens in call order."""
        return self._joined_calls(layer, [layer.output_rows(gy) for gy in raw[layer.name]])

    def rows(self, loss: torch.Tensor, mask: torch.Tensor | None = None, *, retain_graph: bool = False,
             gradient_form: bool = False, covariance_form: bool = False, keep_positions: bool = False):
        """Backpropagate `loss` to the tracked outputs only: returns {name: (a, g)} token rows.
        retain_graph: keep the graph for another loss of the same forward (`paired_rows`).

        Token positions that the mask removes from every example of the batch at its start or end
        (padding to a fixed length, left or right) are cut from a layer's rows when its g is exactly
        zero there too: every use of the rows is then unchanged (a = 0 there, so no outer product g aᵀ
        sees them, and the zero g rows add nothing to S), and the kernels do less work.

        gradient_form: for a pass that uses the rows only through G_n = Σ_t g aᵀ (not a covariance pass), the
        layers of one input channel (a depthwise convolution's groups) on CPU without a mask are returned as
        `gradient_rows` of their per-example gradients (`one_channel_group_grads`): m tokens instead of every
        output position, and no patch rows. covariance_form: for the covariance pass, those layers' a is a
        `Rebuilt` (their input channel, not built into patch rows; see `conv_patch_covariance`). keep_positions:
        no padding cut, so row t is token position t of the batch (per-token scores)."""
        raw = self._output_grads(loss, retain_graph=retain_graph)
        self._gradient_form = {layer.name for layer in self.layers
                               if gradient_form and self._one_channel_forms_apply(layer, mask)}
        rows = self._gradient_form_rows(raw)
        for layer in self.layers:
            if layer.name in rows:
                continue
            if covariance_form and self._one_channel_forms_apply(layer, mask):
                a = Rebuilt(*self._kept_input(layer, mask))
            else:
                a = self.activations(layer, mask)
            rows[layer.name] = _one_dtype(a, self._gradient_rows_of(layer, raw))
        rows = {layer.name: rows[layer.name] for layer in self.layers}  # in the layers' order
        _check_examples(rows)
        # A mask's window is exact for the rows of one call (the mask zeroed their a); a shared module's joined
        # tokens are not the mask's.
        windows = _padding_windows(None if keep_positions else mask, {
            n: r for n, r in rows.items() if n not in self._gradient_form and self.calls(n) == 1})
        self._windows = {name: windows.get(name) for name in rows}
        self._sources = {
            layer.name: self._kept_input(layer, mask)
            for layer in self.layers if layer.kind == "conv" and self._windows[layer.name] is None
            and self.calls(layer.name) == 1 and layer.name not in self._gradient_form
            and not isinstance(rows[layer.name][0], Rebuilt) and not _mask_applies(mask, rows[layer.name][0])}
        return {name: (_cut(a, self._windows[name]), _cut(g, self._windows[name])) for name, (a, g) in rows.items()}

    def _kept_input(self, layer: TrackedLayer, mask: torch.Tensor | None) -> tuple:
        """(make, x, module) for a `Rebuilt` of a conv layer's rows: its input (a group's channels), the patch rows
        from it, and the module where the one-channel forms apply (else None)."""
        return (partial(conv_patch_rows, layer.module), layer.layer_input(self._single_input(layer)),
                layer.module if self._one_channel_forms_apply(layer, mask) else None)

    def _one_channel_forms_apply(self, layer: TrackedLayer, mask: torch.Tensor | None) -> bool:
        """Whether the layer can take the gradient and covariance forms: one input channel, no mask, CPU (measured
        there; on GPU the patch rows' unfold and the scoring kernels are unmeasured against them), called once."""
        x = self._single_input(layer)
        return layer.reads_one_channel and mask is None and x is not None and x.device.type == "cpu"

    def _gradient_form_rows(self, raw: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`gradient_rows` of the layers in gradient form: one `one_channel_group_grads` call per module (all its
        groups at once), from the module's whole input and output gradient."""
        rows, done = {}, set()
        for layer in self.layers:
            if layer.name not in self._gradient_form or id(layer.module) in done:
                continue
            done.add(id(layer.module))
            grads = one_channel_group_grads(layer.module, self._single_input(layer), raw[layer.name][0])
            for member in self.layers:
                if member.module is layer.module and member.name in self._gradient_form:
                    rows[member.name] = gradient_rows(grads[:, member.group].contiguous())
        return rows

    def gradient_form_layers(self) -> set[str]:
        """The layers the last `rows` call gave as `gradient_rows` (its gradient_form)."""
        return set(self._gradient_form)

    def sources(self) -> dict:
        """Per conv layer of the last `rows` call whose activation rows are exactly its patch rows (no mask
        applied, no positions cut, not in gradient form): (make, x, module) with make(x) those rows, x the layer's
        input (a group's channels for a grouped convolution) and the module where its per-example gradients can be
        formed from x and g (`one_channel_group_grads`; else None). A row cache keeps x instead (rows.compact_rows)."""
        return dict(self._sources)

    def paired_rows(self, loss: torch.Tensor, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """The rows of another loss of the same forward as the last `rows` call: {name: (a, g)}, the a
        tensors shared with `rows` and g cut to the same token window (exact for its outer products with
        a, which is zero outside the window); layers in gradient form formed again from the new gradients."""
        raw = self._output_grads(loss, first_loss=False)
        formed = self._gradient_form_rows(raw)
        layers = {layer.name: layer for layer in self.layers}
        return {name: formed[name] if name in formed
                else _one_dtype(a, _cut(self._gradient_rows_of(layers[name], raw), self._windows.get(name)))
                for name, (a, _) in rows.items()}

    def output_rows(self, loss: torch.Tensor, *, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """Backpropagate `loss` to the tracked outputs only: returns {name: g} output-gradient rows."""
        raw = self._output_grads(loss, retain_graph=retain_graph)
        return {layer.name: self._gradient_rows_of(layer, raw) for layer in self.layers}

    def _output_grads(self, loss: torch.Tensor, *, retain_graph: bool = False,
                      first_loss: bool = True) -> dict[str, list[torch.Tensor]]:
        """{name: gradient of `loss` w.r.t. the layer's module output, one per call that reaches the loss} (zeros for
        a module none of whose calls does). first_loss=False: another loss of the same forward (`paired_rows`)."""
        names = [layer.name for layer in self.layers]
        missing = [n for n in names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"tracked modules {missing} were not called in the forward pass (a module whose weight "
                               f"the model reads directly, F.linear(x, m.weight), or that a batch can skip, as an "
                               f"expert of a mixture, cannot be tracked: leave it out of "
                               f"get_influence_tracked_modules())")
        self._check_versions()
        outputs = [(name, out) for name in names for out, _ in self._outputs[name]]
        if not loss.requires_grad:
            raise RuntimeError("the task's loss/measurement does not require grad: tracked layers' outputs must "
                               "be part of its graph")
        detached = sorted({name for name, out in outputs if not out.requires_grad})
        if detached:
            raise RuntimeError(f"the outputs of tracked modules {detached} do not require grad: they were computed "
                               f"without autograd (under torch.no_grad, or inside a reentrant activation checkpoint, "
                               f"torch.utils.checkpoint(..., use_reentrant=True), whose forward runs without it; "
                               f"use_reentrant=False works)")
        self._in_backward = True
        try:
            grads = torch.autograd.grad(loss, [out for _, out in outputs], allow_unused=True,
                                        retain_graph=retain_graph)
        finally:
            self._in_backward = False
        raw: dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]] = {name: [] for name in names}
        for (name, out), gy in zip(outputs, grads):
            raw[name].append((gy, out))
        # Calls the loss does not reach are dropped where another call of the module does reach it (the class doc);
        # the forward's rows and every loss of it must agree on which (a paired loss shares the first one's a rows).
        unused = {}
        for name, calls in raw.items():
            missed = {i for i, (gy, _) in enumerate(calls) if gy is None}
            if missed and len(missed) < len(calls):
                unused[name] = missed
        if first_loss:
            self._unused = unused
        elif unused != self._unused:
            differ = sorted(set(unused) ^ set(self._unused) | {n for n in unused if unused[n] != self._unused.get(n)})
            raise RuntimeError(f"tracked modules {differ} have calls that one loss of the forward reaches and another "
                               f"does not: their rows cannot be shared between the losses")
        return {name: [gy.detach() if gy is not None else torch.zeros_like(out) for gy, out in self._used(name, calls)]
                for name, calls in raw.items()}


def _one_dtype(a, g: torch.Tensor) -> tuple:
    """(a, g) in one dtype, the wider of theirs. Under autocast a module's input (its hook's `a`) keeps the model's
    dtype while its output, hence g, is the autocast dtype (fp32 input, bf16 output gradient): the rows take fp32."""
    source = a.source if isinstance(a, Rebuilt) else a
    if source.dtype == g.dtype:
        return a, g
    dtype = torch.promote_types(source.dtype, g.dtype)
    if source.dtype != dtype:
        a = Rebuilt(a.make, a.source.to(dtype), a.module) if isinstance(a, Rebuilt) else a.to(dtype)
    return a, g.to(dtype)


def _check_examples(rows: dict[str, tuple]) -> None:
    """Every layer's rows have the batch's examples along dim 0 (one per-example gradient each)."""
    sizes = {name: g.shape[0] for name, (_, g) in rows.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"tracked layers disagree on the number of examples in the batch (dim 0 of their inputs and "
                         f"outputs): {sizes}. source_fast reads dim 0 of a tracked module's input as the examples; a "
                         f"module that sees another layout (tokens first, examples folded into other dims) cannot "
                         f"be tracked: leave it out of get_influence_tracked_modules()")


# Cut padded token positions only when that removes at least this fraction: the cut copies the rows.
_MIN_TRIM_FRACTION = 0.1


def _padding_windows(mask: torch.Tensor | None, rows: dict) -> dict[str, tuple[int, int] | None]:
    """Per layer, the token window [lo, hi) to keep (None: keep all): the positions some example of the
    batch keeps, where the layer's rows are [B, T, ·] token rows of the mask's T and g is exactly zero
    outside the window. One host sync for the mask and one for all layers' zero checks."""
    windows: dict[str, tuple[int, int] | None] = dict.fromkeys(rows)
    if mask is None or mask.dim() != 2 or not _config.cut_padding():
        return windows
    tokens = mask.shape[1]
    kept = torch.nonzero(mask.any(0)).flatten()
    if kept.numel() == 0:
        return windows
    lo, hi = int(kept[0]), int(kept[-1]) + 1
    if hi - lo > (1 - _MIN_TRIM_FRACTION) * tokens:
        return windows
    candidates = [name for name, (a, g) in rows.items()
                  if a.dim() == 3 and g.dim() == 3 and a.shape[:2] == mask.shape and g.shape[:2] == mask.shape]
    if not candidates:
        return windows
    outside = torch.stack([rows[n][1][:, :lo].abs().sum() + rows[n][1][:, hi:].abs().sum() for n in candidates])
    for name, zero in zip(candidates, (outside == 0).tolist()):
        if zero:
            windows[name] = (lo, hi)
    return windows


def _cut(rows: torch.Tensor, window: tuple[int, int] | None) -> torch.Tensor:
    """Token rows [B, T, ·] cut to the window's positions (a compact copy, so the full rows can be freed)."""
    return rows if window is None else rows[:, window[0]:window[1]].contiguous()


def _mask_applies(mask: torch.Tensor | None, rows: torch.Tensor) -> bool:
    """Whether `apply_mask` zeroes rows of these activation rows (a [B, T] mask over their T tokens)."""
    return mask is not None and mask.dim() == 2 and mask.shape[1] == rows.shape[1]


def apply_mask(rows: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Zero the activation rows of masked tokens ([B, T] mask, 1 = keep)."""
    if mask.dim() != 2 or mask.shape[0] != rows.shape[0]:
        raise ValueError(f"attention mask must be [batch, tokens] = [{rows.shape[0]}, {rows.shape[1]}] for "
                         f"layer {name!r}, got {tuple(mask.shape)}")
    if not _mask_applies(mask, rows):
        # Conv layers or layers whose tokens are not the sequence: masks do not apply.
        return rows
    return rows * mask.to(rows.dtype)[:, :, None]
