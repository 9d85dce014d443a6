"""A GPT-2-style model from a transformers config (random init, no download) end to end."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import LM_SEQ, LM_VOCAB, TokenDataset, lm_checkpoints, tiny_gpt2

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = LM_VOCAB, LM_SEQ


class LMTask(sf.Task):
    """Next-token NLL summed over tokens (and examples); padded positions ignored."""

    def __init__(self, modules):
        self.modules = modules

    def _loss(self, batch, model, sample):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                drawn = torch.multinomial(F.softmax(logits.reshape(-1, VOCAB).double(), -1), 1).reshape(labels.shape)
                labels = drawn.masked_fill(labels == -100, -100)
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")

    def compute_train_loss(self, batch, model, sample=False):
        return self._loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model, False)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def _gpt2(dtype):
    return tiny_gpt2(dtype)


def _train(model, data):
    return lm_checkpoints(model, data, LMTask(None))


def _conv1d_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def test_gpt2_matches_dense_oracle_float64():
    model = _gpt2(torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (10, SEQ), generator=gen)
    data = TokenDataset(ids, torch.ones_like(ids))
    ckpts, steps = _train(model, data)
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    names = _conv1d_names(model)
    assert len(names) == 4
    task = LMTask(names)
    queries = Subset(data, range(2))
    analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4, progress=False)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6


def test_gpt2_with_padding_runs_end_to_end(tmp_path):
    model = _gpt2(torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (12, SEQ), generator=gen)
    lengths = torch.randint(3, SEQ + 1, (12,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    data = TokenDataset(ids, mask)
    ckpts, steps = _train(model, data)
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)
    analyzer = sf.SourceAnalyzer(model, LMTask(None), run, output_dir=tmp_path, batch_size=5, progress=False)
    tracked = [layer.name for layer in analyzer.layers]
    assert "lm_head" in tracked and any(".attn.c_attn" in n for n in tracked)  # Linear + Conv1D both tracked
    pairwise = analyzer.pairwise_scores(data, data)
    self_scores = analyzer.self_scores(data)
    assert pairwise.shape == (12, 12) and torch.isfinite(pairwise).all()
    assert torch.allclose(self_scores, torch.diagonal(pairwise), rtol=1e-4, atol=1e-7)
    assert (tmp_path / "factors" / "segment_1.safetensors").exists()


def test_transformers_works_from_a_checkout_root():
    """Python started in the repository root puts our `kernels/` folder on sys.path as top-level `kernels`,
    the name of Hugging Face's kernel-hub package, which transformers imports when it finds it. The folder
    must then look absent (not raise) and still refuse to be used under that name."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import transformers, kernels\n"
            "transformers.GPT2LMHeadModel\n"
            "assert kernels.__file__ is None\n"
            "try:\n"
            "    kernels.covariance\n"
            "except ImportError as exc:\n"
            "    print('refused:', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: this folder must be imported as 'source_fast.kernels'" in proc.stdout
