"""LoRA fine-tunes (PEFT): the adapters are the trained layers, tracked by default; adapter checkpoints (PEFT's
`save_pretrained`: adapter weights only, the adapter name left out of their keys) score as the full state_dicts."""
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import ClassificationTask, classification_data, train_run

peft = pytest.importorskip("peft")

LORA_LAYERS = ["base_model.model.0.lora_A.default", "base_model.model.0.lora_B.default",
               "base_model.model.2.lora_A.default", "base_model.model.2.lora_B.default"]


def _lora_mlp(use_dora=False):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    config = peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, init_lora_weights=False, use_dora=use_dora)
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("method", ["source", "influence"])
def test_lora_adapters_are_tracked_and_adapter_checkpoints_score_as_state_dicts(tmp_path, method, use_dora):
    """DoRA too: its adapters also run on an identity matrix for a detached weight norm (calls that do not reach
    the loss, so not the layer's); its magnitude vector trains but is no supported module (left out, as a
    LayerNorm's weight is)."""
    model = _lora_mlp(use_dora)
    data = classification_data(n=16)
    states, steps, lrs = train_run(model, data, steps=9, every=3, lr=0.3)
    dirs = []
    for k, state in enumerate(states):  # adapter-only checkpoints, as a Trainer on a PeftModel writes them
        model.load_state_dict(state)
        model.save_pretrained(tmp_path / f"checkpoint-{steps[k]}")
        dirs.append(str(tmp_path / f"checkpoint-{steps[k]}"))
    kwargs = {"damping": 1e-3} if method == "influence" else {}
    queries = Subset(data, range(3))

    def scores(checkpoints):
        run = sf.TrainingRun(checkpoints, steps, lr=lrs, num_segments=3)
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical",
                                     batch_size=5, progress=False, **kwargs)
        assert [layer.name for layer in analyzer.layers] == LORA_LAYERS  # base layers frozen: left out
        return analyzer.pairwise_scores(queries, data)

    from_states = scores(states)
    assert torch.equal(scores(dirs), from_states)
    run = sf.TrainingRun(states, steps, lr=lrs, num_segments=3)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method,
                                 module_names=LORA_LAYERS, **kwargs)
    assert ((from_states - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6


def test_an_adapter_checkpoint_of_another_model_is_named(tmp_path):
    model = _lora_mlp()
    other = peft.get_peft_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(),
                                peft.LoraConfig(target_modules=["0"], r=2))
    other.save_pretrained(tmp_path / "other")
    run = sf.TrainingRun([str(tmp_path / "other")], [1], lr=0.1, num_segments=1)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, progress=False)
    with pytest.raises(ValueError, match=r"missing keys \['base_model.model.2.lora_A.default.weight'"):
        analyzer.pairwise_scores(classification_data(n=4), classification_data(n=4))


def test_lora_on_a_convolution_matches_the_dense_oracle():
    """PEFT's LoRA on a Conv2d is two convolutions (lora_A: the layer's kernel to r channels, lora_B: 1×1 back):
    tracked as conv layers, scored as the oracle scores them."""
    from _models import TinyCNN

    data = classification_data(n=16, image=True)
    torch.manual_seed(1)
    model = peft.get_peft_model(TinyCNN().double(), peft.LoraConfig(target_modules=["conv", "fc"], r=2,
                                                                     init_lora_weights=False))
    ckpts, steps, lrs = train_run(model, data, steps=6, every=2, lr=0.2)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False)
    names = [layer.name for layer in analyzer.layers]
    assert names == [f"base_model.model.{m}.lora_{x}.default" for m in ("conv", "fc") for x in "AB"]
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, module_names=names)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
