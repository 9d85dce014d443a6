"""Modules called more than once per forward (shared weights): every call's tokens are one layer's rows.

The weight gradient of a module called k times is the sum over its calls, G_n = Σ_calls Σ_t g aᵀ, and every call's
tokens enter its covariances (Kronfluence's `has_shared_parameters`; the dense oracle builds the same). Before this,
the forward hooks kept only the last call and the scores were silently wrong."""
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import source_fast as sf
from source_fast.modules import Capture, find_tracked_layers
from source_fast.reference.dense_source import dense_source_scores

from _models import (LM_VOCAB, ClassificationTask, PairedClassificationTask, SharedMLP, SiameseCNN, TokenDataset,
                     classification_data, lm_checkpoints, padded_tokens, train_run)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _shared_mlp_run(repeats=2):
    data = classification_data(n=20)
    torch.manual_seed(0)
    model = SharedMLP(repeats=repeats).double()
    ckpts, steps, lrs = train_run(model, data, steps=20, every=5, lr=0.3)
    return model, data, sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)


@pytest.mark.parametrize("repeats", [2, 3])
@pytest.mark.parametrize("schedule", ["one pass", "fit first"])
@pytest.mark.parametrize("method", ["source", "influence"])
def test_shared_linear_matches_dense_oracle_float64(method, schedule, repeats):
    model, data, run = _shared_mlp_run(repeats)
    kwargs = {"damping": 1e-3} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, method=method, fisher="empirical",
                                 batch_size=6, progress=False, **kwargs)
    if schedule == "fit first":
        analyzer.fit(data)
    queries = Subset(data, range(4))
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **kwargs)
    assert _rel(scores, oracle) <= 1e-6
    diagonal = dense_source_scores(model, ClassificationTask(), run, data, data, method=method, **kwargs).diagonal()
    assert _rel(analyzer.self_scores(data), diagonal) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("schedule", ["one pass", "fit first"])
def test_siamese_convs_match_dense_oracle(layout, schedule, dtype):
    """A convolution and a depthwise one (whose one-call forms, from the layer input, do not apply to two calls)
    each called on an image and on its mirror; in float32 through the compiled kernels and the row cache."""
    data = classification_data(n=14, image=True)
    torch.manual_seed(1)
    model = SiameseCNN().double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.2)
    oracle_run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    oracle = dense_source_scores(model, ClassificationTask(), oracle_run, queries, data)
    model = model.to(dtype)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    run = sf.TrainingRun([{k: v.to(dtype) for k, v in c.items()} for c in ckpts], steps, lr=lrs, num_segments=3)
    x, y = data.tensors
    data = torch.utils.data.TensorDataset(x.to(dtype), y)
    analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, fisher="empirical", batch_size=5,
                                 progress=False)
    if schedule == "fit first":
        analyzer.fit(data)
    scores = analyzer.pairwise_scores(Subset(data, range(3)), data)
    assert _rel(scores.double(), oracle) <= (1e-6 if dtype == torch.float64 else 1e-5)


class _SharedTokenLM(torch.nn.Module):
    """Embedding, one Linear applied twice per token, output layer: `model(input_ids=, attention_mask=).logits`."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(LM_VOCAB, 6)
        self.shared = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, LM_VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.emb(input_ids)))))
        return type("Output", (), {"logits": self.head(h)})()


def test_shared_module_over_padded_tokens_matches_dense_oracle():
    """The attention mask applies to each call's tokens; the padded positions cut from the other layers' rows are
    kept in the shared module's joined tokens (their a rows are zero there)."""
    torch.manual_seed(0)
    model = _SharedTokenLM().double()
    data = TokenDataset(*padded_tokens(n=10, lengths=(2, 3)), with_labels=False)  # the padding cut applies
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    task = sf.CausalLMTask(["shared", "head"])
    queries = Subset(data, range(3))
    scores = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4,
                               progress=False).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=["shared", "head"])
    assert _rel(scores, oracle) <= 1e-6


def test_capture_joins_every_call_and_their_gradients_sum_to_the_weight_gradient():
    torch.manual_seed(0)
    model = SharedMLP(repeats=3).double()
    x, y = classification_data(n=5).tensors
    layers = find_tracked_layers(model)
    with Capture(layers) as capture:
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        assert [capture.calls(layer.name) for layer in layers] == [1, 3, 1]
        rows = capture.rows(loss)
    a, g = rows["shared"]
    assert a.shape == (5, 3, 6) and g.shape == (5, 3, 5)  # three calls' tokens; the bias column
    for n in range(5):  # each example's weight gradient, from autograd on that example alone
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum").backward()
        want = torch.cat([model.shared.weight.grad, model.shared.bias.grad[:, None]], 1)
        torch.testing.assert_close(g[n].T @ a[n], want, rtol=1e-12, atol=1e-12)


def test_a_shared_module_called_with_another_batch_size_is_named():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).sum(0, keepdim=True) + self.lin(x[:1])

    model = Net().double()
    with Capture(find_tracked_layers(model)) as capture:
        loss = model(torch.randn(3, 4, dtype=torch.float64)).sum()
        with pytest.raises(ValueError, match=r"'lin' was called 2 times .* batch sizes \[3, 1\]"):
            capture.rows(loss)


def test_shared_linear_sampled_fisher_one_pass_equals_fit_first():
    """The one-pass schedule takes the true-label rows of a shared module from the second backward of the same
    forward (`Capture.paired_rows`): the same scores as fit() and its own scoring passes."""
    model, data, run = _shared_mlp_run(repeats=2)
    queries = Subset(data, range(4))
    one = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=6, progress=False)
    scores = one.pairwise_scores(queries, data)
    two = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=6, progress=False)
    two.fit(data)
    assert _rel(scores, two.pairwise_scores(queries, data)) <= 1e-10


class _CheckpointedMLP(torch.nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def block(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x):
        if self.reentrant is None:
            return self.c(self.block(x))
        return self.c(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant))


def test_activation_checkpointing_recomputes_no_second_call():
    """torch.utils.checkpoint(use_reentrant=False) runs the block's forward again inside the backward: those calls
    are not more calls of the modules (the hooks ignore the backward). The reentrant form runs its forward without
    autograd: named."""
    data = classification_data(n=12)
    torch.manual_seed(0)
    model = _CheckpointedMLP(None).double()
    ckpts, steps, lrs = train_run(model, data, steps=6, every=3, lr=0.2)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(3))
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    model.reentrant = False
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False)
    assert _rel(analyzer.pairwise_scores(queries, data), oracle) <= 1e-10
    model.reentrant = True
    with pytest.raises(RuntimeError, match=r"tracked modules \['a', 'b'\] do not require grad.*use_reentrant=False"), \
            pytest.warns(UserWarning, match="None of the inputs have requires_grad"):  # torch's own, for that form
        analyzer.pairwise_scores(queries, data)


@pytest.mark.parametrize("schedule", ["one pass", "fit first"])
def test_outputs_changed_in_place_score_as_without(schedule):
    """nn.ReLU(inplace=True) right after a tracked layer (VGG's convs, many MLPs) changes the tensor the hook kept:
    autograd's gradient w.r.t. it is then the ReLU's output's (32 % off, silently, before). On the first batch that
    shows it, those modules start handing the model a copy and the batch runs again: the scores equal the same
    model's with out-of-place ReLUs."""
    def net(inplace):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(inplace=inplace), torch.nn.Flatten(),
            torch.nn.Linear(3 * 36, 8), torch.nn.ReLU(inplace=inplace), torch.nn.Linear(8, 3)).double()

    data = classification_data(n=14, image=True)
    reference = net(False)
    ckpts, steps, lrs = train_run(reference, data, steps=6, every=3, lr=0.2)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(3))
    scores = []
    for model in (reference, net(True)):
        analyzer = sf.SourceAnalyzer(model, PairedClassificationTask(), run, batch_size=5, progress=False)
        if schedule == "fit first":
            analyzer.fit(data)
        scores.append(analyzer.pairwise_scores(queries, data))
        if model is not reference:
            assert len(analyzer._copied_outputs) == 2  # the conv and the first Linear
    assert torch.equal(scores[1], scores[0])


class DetachedSecondCall(nn.Module):
    """Calls its first layer twice: on the batch, and on an identity matrix whose result is used detached (as PEFT's
    DoRA computes a weight norm): only the first call is part of the gradient."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        weight = self.lin(torch.eye(4, dtype=x.dtype)).detach()
        scale = 1.0 / weight.norm(dim=0).view(1, -1)
        return self.head(torch.tanh(self.lin(x) * scale))


def test_a_call_the_loss_does_not_reach_is_no_call_of_the_layer():
    torch.manual_seed(0)
    model = DetachedSecondCall().double()
    data = classification_data(n=12)
    ckpts, steps, lrs = train_run(model, data, steps=6, every=2, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
