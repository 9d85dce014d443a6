"""SourceAnalyzer.per_token_scores: each training token position's share of the scores, against the dense oracle's
per-position gradients, summing to pairwise_scores for every method, resumable."""
import warnings

import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import io, per_token
from source_fast.reference.dense_source import dense_source_scores

from _models import (ClassificationTask, adam_mlp_run, classification_data, mlp, padded_gpt2_run, tiny_cnn_run,
                     train_run)

METHODS = ["source", "fast_source", "influence", "tracin", "gradient_dot"]


def _rel(x, y):
    return ((x - y).abs().max() / y.abs().max()).item()


def _extra(method):
    return {"damping": 0.1} if method == "influence" else {}


@pytest.fixture(scope="module")
def gpt2_run():
    """A one-block GPT-2 (float64) on 10 right-padded documents of 3..6 tokens, 8 SGD steps, 4 checkpoints."""
    pytest.importorskip("transformers")
    return padded_gpt2_run()


@pytest.mark.parametrize("method", ["source", "influence"])
def test_gpt2_per_token_scores_match_the_dense_oracle_float64(gpt2_run, method):
    """The oracle forms each position's gradient g_t a_tᵀ from its own hooks (their sum asserted equal to
    autograd's per-example gradient) and contracts it with its dense operators."""
    model, data, mask, task, names, run = gpt2_run
    queries = Subset(data, range(2))
    analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4, progress=False, method=method,
                                 **_extra(method))
    scores = analyzer.per_token_scores(queries, data)
    assert scores.shape == (2, 10, mask.shape[1]) and scores.dtype == torch.float64
    oracle = dense_source_scores(model, task, run, queries, data, method=method, module_names=names, per_token=True,
                                 **_extra(method))
    assert _rel(scores, oracle) <= 1e-6
    assert (scores[:, mask == 0] == 0).all()  # padded positions: exactly 0
    predicting = mask.clone()
    predicting[torch.arange(len(mask)), mask.sum(1) - 1] = 0  # a document's last token predicts nothing: g = 0
    assert (scores[:, predicting == 1] != 0).all() and (scores[:, predicting == 0] == 0).all()
    assert _rel(scores.sum(-1), analyzer.pairwise_scores(queries, data)) <= 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_per_token_scores_sum_to_the_pairwise_scores_for_every_method(gpt2_run, method):
    model, data, _, task, _, run = gpt2_run
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, task, run, batch_size=3, score_block=4, progress=False, method=method,
                                 **_extra(method))
    scores = analyzer.per_token_scores(queries, data)
    assert _rel(scores.sum(-1), analyzer.pairwise_scores(queries, data)) <= 1e-10
    # the positions' shares differ: not one score spread evenly
    assert scores[:, :, 0].abs().max() > 0 and not torch.allclose(scores[:, :, 0], scores[:, :, 1])


def test_batches_of_their_own_length_are_zero_beyond_it(gpt2_run):
    """A collate_fn padding each batch to its own longest document: T is the longest batch's, a batch's shorter rows
    score 0 past them, and the scores equal those of the dataset padded to one length."""
    model, data, _, task, _, run = gpt2_run

    def collate(items):  # each batch cut to its longest document (right padding)
        batch = torch.utils.data.default_collate(items)
        longest = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :longest] for k, v in batch.items()}

    queries = Subset(data, range(2))
    fixed = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=2,
                              progress=False).per_token_scores(queries, data)
    ragged = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=2, progress=False, collate_fn=collate)
    scores = ragged.per_token_scores(queries, data)
    lengths = [int(collate([data[i] for i in range(b, b + 2)])["input_ids"].shape[1]) for b in range(0, 10, 2)]
    assert len(set(lengths)) > 1 and scores.shape[2] == max(lengths)
    for b, length in zip(range(0, 10, 2), lengths):
        assert (scores[:, b:b + 2, length:] == 0).all()
    assert _rel(scores, fixed) <= 1e-10


def test_one_token_layers_per_token_is_pairwise_with_stage_masks():
    """An MLP sees one position per example: its per-token scores are the pairwise scores, stage masks and N_ℓ of
    a two-stage run included (an example of stage 0 gets nothing from stage 1's segments)."""
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=24, every=4, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, stage_boundaries=[12],
                         example_stages=[0] * 12 + [1] * 8)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=6, progress=False)
    queries = Subset(data, range(3))
    scores = analyzer.per_token_scores(queries, data)
    assert scores.shape == (3, 20, 1)
    assert _rel(scores[..., 0], dense_source_scores(model, ClassificationTask(), run, queries, data)) <= 1e-6


def test_adam_runs_per_token_scores_sum_to_pairwise():
    model, data, *_, run = adam_mlp_run()
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False)
    queries = Subset(data, range(3))
    assert _rel(analyzer.per_token_scores(queries, data)[..., 0], analyzer.pairwise_scores(queries, data)) <= 1e-10


def test_layers_that_see_other_positions_are_named():
    model, data, ckpts, steps, lrs = tiny_cnn_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", progress=False)
    with pytest.raises(ValueError, match=r"same token positions.*'conv': 9.*'fc': 1"):
        analyzer.per_token_scores(Subset(data, range(2)), data)
    assert analyzer._n_fit is None  # found on one batch, before the fit's passes
    # one layer alone: its output positions are the tokens, and they sum to that layer's pairwise scores
    conv_only = sf.SourceAnalyzer(model, sf.ClassificationTask(["conv"]), run, fisher="empirical", progress=False)
    scores = conv_only.per_token_scores(Subset(data, range(2)), data)
    assert scores.shape == (2, 16, 9)
    assert _rel(scores.sum(-1), conv_only.pairwise_scores(Subset(data, range(2)), data)) <= 1e-10


def test_per_token_scores_resume_from_finished_blocks(gpt2_run, tmp_path, monkeypatch):
    model, data, _, task, _, run = gpt2_run
    queries = Subset(data, range(2))

    def analyzer(**kw):
        return sf.SourceAnalyzer(model, task, run, tmp_path, batch_size=2, score_block=4, progress=False, **kw)

    first = analyzer().per_token_scores(queries, data)
    files = sorted((tmp_path / "scores" / "per_token_source").glob("block_*.safetensors"))
    assert [f.name for f in files] == ["block_0.safetensors", "block_1.safetensors", "block_2.safetensors"]
    computed = []
    real_block = per_token._block
    monkeypatch.setattr(per_token, "_block", lambda a, b, *rest: computed.append(b) or real_block(a, b, *rest))
    assert torch.equal(analyzer().per_token_scores(queries, data), first) and computed == []
    files[1].write_bytes(files[1].read_bytes()[:100])  # a damaged block is recomputed, with a warning
    with pytest.warns(RuntimeWarning, match="recomputing block 1"):
        assert torch.equal(analyzer().per_token_scores(queries, data), first)
    assert computed == [1]
    with pytest.raises(io.StoreMismatchError):
        analyzer().per_token_scores(Subset(data, range(3)), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = analyzer(overwrite=True).per_token_scores(Subset(data, range(3)), data)
    assert torch.allclose(again[:2], first, rtol=1e-12, atol=0)


def test_per_token_scores_of_a_querys_top_documents_are_columns_of_the_full_scores(gpt2_run):
    """The large-N workflow: fit on the whole training set, top_k, then per-token scores of those documents only
    (a Subset): the full matrix's columns, and they sum to the top-k values."""
    model, data, _, task, _, run = gpt2_run
    queries = Subset(data, range(2))
    analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4, progress=False)
    analyzer.fit(data)
    full = analyzer.per_token_scores(queries, data)
    values, indices = analyzer.top_k(queries, data, k=3)
    part = analyzer.per_token_scores(queries, Subset(data, indices[0].tolist()))
    assert _rel(part, full[:, indices[0], :part.shape[2]]) <= 1e-12
    assert _rel(part[0].sum(-1), values[0]) <= 1e-12


def test_a_result_larger_than_host_memory_is_refused_before_any_pass(gpt2_run, monkeypatch):
    from source_fast import analyzer as analyzer_module

    model, data, _, task, _, run = gpt2_run
    analyzer = sf.SourceAnalyzer(model, task, run, batch_size=4, progress=False)
    monkeypatch.setattr(analyzer_module, "_available_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"would hold \[2, 10, >= 6\] scores, at least 0.0 GiB .* top_k"):
        analyzer.per_token_scores(Subset(data, range(2)), data)
    assert analyzer._n_fit is None
