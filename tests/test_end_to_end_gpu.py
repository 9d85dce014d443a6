"""The whole pipeline with the model on a CUDA device (marker `gpu`), against the CPU float64 oracle.

The ops tests prove each kernel; these prove the pipeline keeps every tensor on the model's device (batches,
factors, eigenbases, the walk's buffers, score blocks) and that the automatic dispatch on CUDA tensors gives
the same scores as the dense oracle: float64 tightly (the torch path), float32 by ranks and a tolerance set
by fp32 accumulation over a few hundred terms.
"""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import ClassificationTask, mlp, small_mlp_run, tiny_cnn_run

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double().cpu() - b).abs().max() / b.abs().max()).item()


def _to(ckpts, device, dtype):
    return [{k: v.to(device, dtype) for k, v in c.items()} for c in ckpts]


def _cuda_dataset(data, dtype):
    x, y = data.tensors
    return torch.utils.data.TensorDataset(x.to("cuda", dtype), y.to("cuda"))


_KW = {"source": {}, "influence": {"damping": 0.01}}


@pytest.fixture(scope="module")
def mlp_case():
    model, data, ckpts, steps, lrs = small_mlp_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(6))
    oracle = {m: dense_source_scores(model, ClassificationTask(), run, queries, data, method=m, **_KW[m])
              for m in _KW}
    return model, data, ckpts, steps, lrs, oracle


@pytest.mark.parametrize("method", ["source", "influence"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mlp_on_cuda_matches_cpu_oracle(mlp_case, method, dtype):
    model, data, ckpts, steps, lrs, oracle = mlp_case
    run = sf.TrainingRun(_to(ckpts, "cuda", dtype), steps, lr=lrs, num_segments=3)
    cuda_data = _cuda_dataset(data, dtype)
    analyzer = sf.SourceAnalyzer(mlp(d_in=6, hidden=8).to("cuda", dtype), ClassificationTask(), run, method=method,
                                 fisher="empirical", batch_size=16, progress=False, **_KW[method])
    scores = analyzer.pairwise_scores(Subset(cuda_data, range(6)), cuda_data)
    assert scores.device.type == "cpu" and scores.dtype == dtype  # the API returns CPU tensors
    assert _rel(scores, oracle[method]) <= (1e-6 if dtype == torch.float64 else 2e-3)
    self_scores = analyzer.self_scores(cuda_data)
    diagonal = analyzer.pairwise_scores(cuda_data, cuda_data).diagonal()
    assert _rel(self_scores, diagonal.double()) <= (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("score_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mlp_on_cuda_low_precision_scoring_keeps_rankings(mlp_case, score_dtype):
    """score_dtype: the scoring contraction on 16-bit operands (the tensor-core kernels the dispatch picks)
    stays within a few percent of the oracle and keeps each query's ranking."""
    model, data, ckpts, steps, lrs, oracle = mlp_case
    run = sf.TrainingRun(_to(ckpts, "cuda", torch.float32), steps, lr=lrs, num_segments=3)
    cuda_data = _cuda_dataset(data, torch.float32)
    analyzer = sf.SourceAnalyzer(mlp(d_in=6, hidden=8).to("cuda", torch.float32), ClassificationTask(), run,
                                 fisher="empirical", batch_size=16, progress=False, score_dtype=score_dtype)
    scores = analyzer.pairwise_scores(Subset(cuda_data, range(6)), cuda_data)
    assert _rel(scores, oracle["source"]) <= 3e-2
    for q in range(scores.shape[0]):
        ranks = torch.stack([scores[q].double().argsort().argsort(), oracle["source"][q].argsort().argsort()])
        assert torch.corrcoef(ranks.double())[0, 1] > 0.99, q


@pytest.mark.parametrize("decay", ["uniform", "weights-only"])
def test_mlp_with_weight_decay_on_cuda_matches_cpu(mlp_case, decay):
    """Weight decay's shift of Λ on the device: uniform against the oracle; weights-only (the eigen-diagonal
    projection, computed on the device) against the same run on CPU."""
    model, data, ckpts, steps, lrs, _ = mlp_case
    weight_decay = 0.2 if decay == "uniform" else {"0.weight": 0.2, "2.weight": 0.2}

    def scores(device):
        run = sf.TrainingRun(_to(ckpts, device, torch.float64), steps, lr=lrs, num_segments=3,
                             weight_decay=weight_decay)
        x, y = data.tensors
        on_device = torch.utils.data.TensorDataset(x.to(device), y.to(device))
        analyzer = sf.SourceAnalyzer(mlp(d_in=6, hidden=8).to(device, torch.float64), ClassificationTask(), run,
                                     fisher="empirical", batch_size=16, progress=False)
        return analyzer.pairwise_scores(Subset(on_device, range(6)), on_device), run

    got, run = scores("cuda")
    if decay == "uniform":
        assert _rel(got, dense_source_scores(model, ClassificationTask(), run, Subset(data, range(6)), data)) <= 1e-6
    else:
        assert _rel(got, scores("cpu")[0]) <= 1e-9


def test_cnn_on_cuda_matches_cpu_oracle_float64():
    model, data, ckpts, steps, lrs = tiny_cnn_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    oracle = dense_source_scores(model, ClassificationTask(), run, Subset(data, range(3)), data)
    cuda_run = sf.TrainingRun(_to(ckpts, "cuda", torch.float64), steps, lr=lrs, num_segments=3)
    cuda_data = _cuda_dataset(data, torch.float64)
    analyzer = sf.SourceAnalyzer(model.to("cuda"), ClassificationTask(), cuda_run, fisher="empirical", batch_size=5,
                                 progress=False)
    scores = analyzer.pairwise_scores(Subset(cuda_data, range(3)), cuda_data)
    assert _rel(scores, oracle) <= 1e-6


def test_causal_lm_on_cuda_matches_cpu_oracle_with_padding():
    """sf.CausalLMTask on CUDA (nll_pair's no-sync path, padded positions cut from the rows on the device):
    a padded GPT-2 in float64 against the CPU dense oracle; the sampled Fisher runs one pass per checkpoint."""
    pytest.importorskip("transformers")
    from _models import TokenDataset, lm_checkpoints, padded_tokens, tiny_gpt2

    data = TokenDataset(*padded_tokens(8, (2, 3)), with_labels=False)  # ≤ 3 of 6 positions: the cut applies
    model = tiny_gpt2()
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = sf.CausalLMTask(names)
    queries = Subset(data, range(3))
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names)
    cuda_run = sf.TrainingRun(_to(ckpts, "cuda", torch.float64), steps, lr=0.5, num_segments=2)
    gpu_model = tiny_gpt2().to("cuda")
    scores = sf.SourceAnalyzer(gpu_model, task, cuda_run, fisher="empirical", batch_size=4,
                               progress=False).pairwise_scores(queries, data)
    assert _rel(scores, oracle) <= 1e-6
    forwards = []
    handle = gpu_model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        sampled = sf.SourceAnalyzer(gpu_model, task, cuda_run, batch_size=4, progress=False).pairwise_scores(
            queries, data)
    finally:
        handle.remove()
    assert torch.isfinite(sampled).all() and len(forwards) == 4 * 2 + 1  # 4 checkpoints × 2 batches + queries


def test_per_token_and_low_rank_scores_on_cuda_match_cpu_oracle():
    """per_token_scores (rows with every position kept, score_per_token on the device) and query_rank (the subspace
    iteration and score_lowrank on the device) on a padded GPT-2 in float64, against the CPU dense oracle."""
    pytest.importorskip("transformers")
    from _models import TokenDataset, lm_checkpoints, padded_tokens, tiny_gpt2

    data = TokenDataset(*padded_tokens(8))
    model = tiny_gpt2()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = sf.CausalLMTask(names)
    ckpts, steps = lm_checkpoints(model, data, task)
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    queries = Subset(data, range(3))
    cuda_run = sf.TrainingRun(_to(ckpts, "cuda", torch.float64), steps, lr=0.5, num_segments=2)
    analyzer = sf.SourceAnalyzer(tiny_gpt2().to("cuda"), task, cuda_run, fisher="empirical", batch_size=4,
                                 progress=False)
    per_token = analyzer.per_token_scores(queries, data)
    assert _rel(per_token, dense_source_scores(model, task, run, queries, data, module_names=names,
                                               per_token=True)) <= 1e-6
    low = sf.SourceAnalyzer(tiny_gpt2().to("cuda"), task, cuda_run, fisher="empirical", batch_size=4,
                            progress=False, query_rank=2).pairwise_scores(queries, data)
    assert _rel(low, dense_source_scores(model, task, run, queries, data, module_names=names, query_rank=2)) <= 1e-6
