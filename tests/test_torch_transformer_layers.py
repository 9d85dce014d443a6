"""torch's own transformer layers: nn.MultiheadAttention's out_proj (never called as a module) and the
sequence-first layout (batch_first=False, the default), whose Linears see [T, B, ·]."""
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from source_fast.modules import find_tracked_layers
from source_fast.reference.dense_source import dense_source_scores

from _models import ClassificationTask, train_run

TOKENS = 4


class Encoder(nn.Module):
    """Linear embedding, one nn.TransformerEncoderLayer, mean over tokens, linear head; x [B, T, 3]."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        h = self.enc(h) if self.batch_first else self.enc(h.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


def _data(n=12):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, TOKENS, 3, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=gen))


def test_multihead_attention_out_proj_is_left_out_or_named_as_untrackable():
    model = Encoder(batch_first=True)
    assert [layer.name for layer in find_tracked_layers(model)] == ["emb", "enc.linear1", "enc.linear2", "head"]
    with pytest.raises(ValueError, match=r"'enc.self_attn.out_proj': nn.MultiheadAttention uses its out_proj's "
                                         r"weight directly"):
        find_tracked_layers(model, ["emb", "enc.self_attn.out_proj"])


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_matches_dense_oracle_float64(batch_first):
    """Every batch has T examples: a sequence-first layer read as batch-first would pass every shape check and be
    wrong (15 % off the oracle)."""
    data = _data()
    torch.manual_seed(0)
    model = Encoder(batch_first).double()
    layers = find_tracked_layers(model)
    assert [layer.batch_dim for layer in layers] == [0, 0 if batch_first else 1, 0 if batch_first else 1, 0]
    ckpts, steps, lrs = train_run(model, data, steps=9, every=3, lr=0.1)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(TOKENS))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=TOKENS,
                                 progress=False)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data,
                                 module_names=[layer.name for layer in layers])
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6


