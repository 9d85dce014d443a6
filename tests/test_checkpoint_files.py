"""Checkpoints given as paths: torch.save files, .safetensors files and Hugging Face model directories
(`save_pretrained`, one file or shards, safetensors or pytorch_model.bin), with tied weights stored once."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast.io import load_state_dict

from _models import ClassificationTask, TokenDataset, classification_data, lm_checkpoints, mlp, padded_tokens, \
    tiny_gpt2, train_run


def _scores(model, task, checkpoints, steps, queries, data, batch_size=4):
    run = sf.TrainingRun(checkpoints, steps, lr=0.5, num_segments=2)
    return sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=batch_size,
                             progress=False).pairwise_scores(queries, data)


@pytest.mark.parametrize("form", ["safetensors", "sharded safetensors", "pytorch_model.bin"])
def test_hugging_face_model_directories_score_as_their_state_dicts(tmp_path, form):
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    data = TokenDataset(*padded_tokens(n=8), with_labels=False)
    states, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    dirs = []
    for k, state in enumerate(states):
        model.load_state_dict(state)
        kwargs = {"safe_serialization": form != "pytorch_model.bin"}
        if form == "sharded safetensors":
            kwargs["max_shard_size"] = "2KB"
        model.save_pretrained(tmp_path / f"checkpoint-{steps[k]}", **kwargs)
        dirs.append(tmp_path / f"checkpoint-{steps[k]}")
    stored = load_state_dict(dirs[0])
    if form != "pytorch_model.bin":
        assert "lm_head.weight" not in stored  # tied to transformer.wte.weight: saved once
    if form == "sharded safetensors":
        assert (dirs[0] / "model.safetensors.index.json").is_file()
    queries = Subset(data, range(3))
    want = _scores(model, sf.CausalLMTask(), states, steps, queries, data)
    got = _scores(model, sf.CausalLMTask(), [str(d) for d in dirs], steps, queries, data)
    assert torch.equal(got, want)


def test_safetensors_and_torch_save_files(tmp_path):
    from safetensors.torch import save_file

    data = classification_data(n=12)
    model = mlp()
    states, steps, _ = train_run(model, data, steps=6, every=2, lr=0.3)
    paths = []
    for k, state in enumerate(states):
        path = tmp_path / (f"ckpt{k}.safetensors" if k % 2 else f"ckpt{k}.pt")
        save_file(state, str(path)) if k % 2 else torch.save(state, path)
        paths.append(path)
    queries = Subset(data, range(3))
    want = _scores(model, ClassificationTask(), states, steps, queries, data)
    assert torch.equal(_scores(model, ClassificationTask(), paths, steps, queries, data), want)


def test_a_directory_without_model_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds none of \['model.safetensors'.*found \['config.json'\]"):
        load_state_dict(tmp_path)
