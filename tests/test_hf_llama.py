"""A Llama-style model from a transformers config (random init, no download): rotary attention with grouped
key/value heads, a gated MLP, RMSNorm; its nn.Linear projections tracked, with right padding, against the dense
oracle (the output layer through the model's logits, and fused with `linear_nll_pair`)."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import LM_SEQ, LM_VOCAB, TokenDataset, lm_checkpoints, padded_tokens

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fused_output_layer", [False, True])
def test_llama_projections_match_dense_oracle_float64(fused_output_layer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=LM_VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=LM_SEQ)
    model = transformers.LlamaForCausalLM(config).double()
    data = TokenDataset(*padded_tokens(), with_labels=False)
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(names) == 7  # q, k, v, o; gate, up, down
    task = sf.CausalLMTask(names, fused_output_layer=fused_output_layer)
    queries = Subset(data, range(3))
    scores = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4,
                               progress=False).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
