"""source_fast.rows: kept rows' byte accounting and the compact form of conv rows (rows.Rebuilt)."""
import pytest
import torch
from torch import nn

from source_fast import modules
from source_fast.rows import Rebuilt, RowBudget, RowCache, compact_rows, expanded_rows, rows_nbytes, stacking_pays


def test_conv_rows_kept_as_their_source_are_rebuilt_equal_and_counted_by_the_source():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    (layer,) = modules.find_tracked_layers(nn.Sequential(conv), ["0"])
    x = torch.randn(4, 2, 5, 5)
    a, g = layer.input_rows(x), torch.randn(4, 25, 3)
    dense = {"0": (a, g), "fc": (torch.randn(4, 1, 7), torch.randn(4, 1, 2))}
    compact = compact_rows(dense, {"0": (layer.input_rows, x)})
    assert isinstance(compact["0"][0], Rebuilt) and compact["0"][1] is g and compact["fc"] is not None
    assert rows_nbytes(compact) == rows_nbytes(dense) - a.numel() * 4 + x.numel() * 4
    cache = RowCache(RowBudget(rows_nbytes(compact)))
    assert cache.offer("u", 4, compact)
    ((size, rows),) = list(cache.take("u"))
    assert size == 4 and torch.equal(rows["0"][0], a) and rows["0"][1] is g and rows["fc"][0] is dense["fc"][0]
    assert expanded_rows(dense)["0"][0] is a  # tensors pass through


def test_a_source_larger_than_its_rows_is_not_used():
    """A 1×1 convolution with stride 2 has fewer patch values than input values: the rows are kept."""
    conv = nn.Conv2d(4, 3, 1, stride=2, bias=False)
    (layer,) = modules.find_tracked_layers(nn.Sequential(conv), ["0"])
    x = torch.randn(2, 4, 6, 6)
    a = layer.input_rows(x)
    assert a.numel() < x.numel()
    kept = compact_rows({"0": (a, torch.zeros(2, 9, 3))}, {"0": (layer.input_rows, x)})
    assert kept["0"][0] is a


def test_a_depthwise_group_is_kept_as_its_own_channel():
    """Each group of a depthwise convolution is kept as its input channel (H·W values against H·W·(k² + 1) patch
    values), rebuilt to the group's rows."""
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    model = nn.Sequential(conv)
    layers = modules.find_tracked_layers(model, ["0"])
    x = torch.randn(2, 3, 5, 5)
    with modules.Capture(layers) as capture:
        rows = capture.rows(model(x).square().sum())
        sources = capture.sources()
    kept = compact_rows(rows, sources)
    for k, layer in enumerate(layers):
        a, _ = kept[layer.name]
        assert isinstance(a, Rebuilt) and a.nbytes == 2 * 25 * 4 and torch.equal(a.source, x[:, k:k + 1])
        assert torch.equal(a.rows(), rows[layer.name][0])


def test_stacking_pays_for_one_token_layers_and_small_calls_not_for_conv_positions():
    """The measured cases behind rows.stacking_pays (512 examples of 2 members, 100 queries): a conv layer's
    positions are scored piece by piece, a one-token linear layer stacked, and tiny pieces stacked for their calls."""
    assert not stacking_pays(100, 16, 28, [1024, 1024], 512, 8)  # conv 3→16 at 32×32: 4.6x faster unstacked
    assert not stacking_pays(100, 32, 145, [256, 256], 512, 8)  # conv 16→32 at 16×16: 1.9x faster unstacked
    assert stacking_pays(100, 10, 2049, [1, 1], 512, 8)  # linear 2048→10: 1.8x faster stacked
    assert stacking_pays(4, 8, 9, [1, 1], 16, 8)  # a few bytes per piece: one call instead of eight


def test_kept_depthwise_groups_expand_to_their_gradients_in_one_call(monkeypatch):
    """With gradient_form (the eigen-correction's and scoring's use of kept rows), the groups of a depthwise
    convolution kept as their input channels expand to `Formed` per-example gradients, formed by one call for the
    module: the same Σ_t g aᵀ as their patch rows; other layers expand as before."""
    from source_fast import modules as modules_module
    from source_fast.rows import Formed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 25, 2))
    layers = modules.find_tracked_layers(model)
    x = torch.randn(2, 3, 5, 5)
    with modules.Capture(layers) as capture:
        rows = capture.rows(model(x).square().sum())
        kept = compact_rows(rows, capture.sources())
    calls, form = [], modules_module.one_channel_group_grads
    monkeypatch.setattr("source_fast.rows.one_channel_group_grads", lambda *args: calls.append(1) or form(*args))
    formed = expanded_rows(kept, gradient_form=True)
    assert len(calls) == 1 and list(formed) == list(rows)
    for layer in layers:
        a, g = formed[layer.name]
        want = torch.bmm(rows[layer.name][1].transpose(1, 2), rows[layer.name][0])
        if layer.kind == "conv":
            assert isinstance(a, Formed) and g is None and a.shape == (2, 2, 10)
            torch.testing.assert_close(a.grads, want, rtol=1e-5, atol=1e-5)
        else:
            assert a is rows[layer.name][0]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_joined_and_stacked_are_views_of_consecutive_group_slices(layout):
    """A module's groups read consecutive channels of its input and write consecutive channels of its output: their
    cat (and the stack of their output-gradient rows) is then a view of the module's tensor, in either layout;
    anything else is the copy torch.cat / torch.stack make."""
    from source_fast.rows import joined, stacked

    x = torch.randn(4, 6, 5, 3).contiguous(memory_format=layout)
    for width in (1, 2, 3):
        parts = [x[:, k:k + width] for k in range(0, 6, width)]
        view = joined(parts, dim=1)
        assert torch.equal(view, x) and view.data_ptr() == x.data_ptr()
        rows = [p.reshape(4, width, -1).transpose(1, 2) for p in parts]  # a group's g rows [B, positions, m]
        view = stacked(rows)
        assert torch.equal(view, torch.stack(rows)) and view.data_ptr() == x.data_ptr()
        # joined back along channels (rows.expanded_rows): a reshape sets a size-1 dim's stride to anything
        channels = [r.transpose(1, 2) for r in rows]
        view = joined(channels, dim=1)
        assert torch.equal(view, torch.cat(channels, dim=1)) and view.data_ptr() == x.data_ptr()
    middle = joined([x[:, 1:2], x[:, 2:3], x[:, 3:4]], dim=1)
    assert torch.equal(middle, x[:, 1:4]) and middle.data_ptr() == x[:, 1:4].data_ptr()
    assert joined([x[:, 2:3]], dim=1) is not None and joined([x[:, 2:3]], dim=1).data_ptr() == x[:, 2:3].data_ptr()
    assert torch.equal(stacked([x[:, 0]]), x[:, 0][None])
    copies = [([x[:, 0:1], x[:, 2:3]], 1),            # not consecutive
              ([x[:, 1:2], x[:, 0:1]], 1),            # out of order
              ([x[:, 0:1], x[:, 0:1]], 1),            # the same slice twice
              ([x[:, 0:1], x[:, 1:3]], 1),            # unequal widths
              ([x[:, 0:1], x[:, 1:2].clone()], 1),    # another tensor
              ([x[:, :, 0:1], x[:, :, 1:2]], 1)]      # consecutive along another dim than the joined one
    for parts, dim in copies:
        assert torch.equal(joined(parts, dim=dim), torch.cat(parts, dim=dim))
    for parts, _ in copies[:5]:
        if all(p.shape == parts[0].shape for p in parts):
            assert torch.equal(stacked(parts), torch.stack(parts))


def _conv_model_rows(layout=torch.contiguous_format):
    """One batch's covariance-pass rows (a depthwise conv's groups as `Rebuilt` of their channels) and sources of a
    model with a 3×3 conv (many positions), a depthwise conv, a 1×1 conv on 2×2 positions and a linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.Tanh(), nn.AvgPool2d(3), nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(24, 3))
    model = model.double().to(memory_format=layout)
    layers = modules.find_tracked_layers(model)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64).contiguous(memory_format=layout)
    with modules.Capture(layers) as capture:
        rows = capture.rows(model(x).square().sum(), covariance_form=True)
        sources = capture.sources()
    return layers, rows, sources


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kept_rows_form_the_gradients_of_layers_with_many_positions(layout):
    """`formed_layers` picks the layers whose G_n take at most half the bytes of their kept rows (the 3×3 conv's 36
    positions, the depthwise groups), not the 1×1 conv on 4 positions (6·5 values of G_n against 4·(5 + 6) of rows)
    nor the one-token linear layer; `kept_rows` keeps those as `Formed` G_n = Σ_t g aᵀ (a depthwise module's groups
    from one call), the rest as `compact_rows` does, in `kept_nbytes` bytes; `expanded_rows` passes them on to uses
    through G_n (gradient_form) and refuses them to others. `with_formed_gradients` forms the same G_n, bitwise."""
    from source_fast.rows import Formed, formed_layers, kept_nbytes, kept_rows, with_formed_gradients

    layers, rows, sources = _conv_model_rows(layout)
    depthwise = [layer.name for layer in layers if layer.groups == 4]
    formed = formed_layers(rows, sources)
    assert formed == {"0", *depthwise}
    kept = kept_rows(rows, sources, formed)
    assert list(kept) == list(rows) and rows_nbytes(kept) == kept_nbytes(rows, sources, formed)
    shared = kept_nbytes(rows, sources, formed, shared_a=True)
    assert shared == rows_nbytes(kept) - sum(rows_nbytes({n: (kept[n][0],)}) for n in kept if n not in formed)
    expanded = expanded_rows(kept, gradient_form=True)
    full = expanded_rows(rows, gradient_form=False)  # every layer's token rows
    for layer in layers:
        a, g = kept[layer.name]
        want = torch.bmm(full[layer.name][1].transpose(1, 2), full[layer.name][0])
        if layer.name in formed:
            assert isinstance(a, Formed) and g is None and a.grads.dtype == torch.float64
            torch.testing.assert_close(a.grads, want, rtol=1e-12, atol=1e-12)
            assert expanded[layer.name] == (a, None) and a.shape == want.shape
            if layer.groups == 1:  # (the depthwise groups are in their own gradient form in other passes)
                again, none = with_formed_gradients(full, sources, set())[layer.name]
                assert none is None and torch.equal(again.grads, a.grads)
        else:
            assert not isinstance(a, Formed) and g is rows[layer.name][1]
    with pytest.raises(ValueError, match="'0' was kept as its per-example gradients"):
        expanded_rows(kept)
    # Without convs (the scoring passes): only the layers given as gradient rows become Formed, as they are.
    given = {name: (torch.ones(3, 1, 10), None) if name in depthwise else pair for name, pair in full.items()}
    groups_only = with_formed_gradients(given, sources, set(depthwise), convs=False)
    assert all(isinstance(groups_only[name][0], Formed) for name in depthwise)
    assert groups_only[depthwise[0]][0].grads is given[depthwise[0]][0]
    assert all(groups_only[name] == given[name] for name in given if name not in depthwise)


def test_formed_layers_leave_gpu_rows_as_they_are():
    """On other devices than the CPU the kernels take token rows as they come (the choice is unmeasured there)."""
    from source_fast.rows import formed_layers

    a, g = torch.empty(4, 1024, 28, device="meta"), torch.empty(4, 1024, 16, device="meta")
    assert formed_layers({"conv": (a, g)}, {}) == set()
    assert formed_layers({"conv": (torch.empty(4, 1024, 28), torch.empty(4, 1024, 16))}, {}) == {"conv"}


def test_a_row_cache_makes_offered_rows_only_when_they_fit():
    """RowCache.offer takes a function making the rows: called only for a batch within the budget; its bytes must
    be given."""
    cache = RowCache(RowBudget(100))
    made = []

    def make():
        made.append(1)
        return {"x": (torch.zeros(4), torch.zeros(4))}

    assert cache.offer("u", 1, make, nbytes=64) and made == [1]
    assert not cache.offer("u", 1, make, nbytes=64) and made == [1]  # over the budget: not made
    with pytest.raises(ValueError, match="nbytes is required"):
        RowCache(RowBudget(100)).offer("v", 1, make)
    ((size, rows),) = list(cache.take("u"))
    assert size == 1 and torch.equal(rows["x"][0], torch.zeros(4))
