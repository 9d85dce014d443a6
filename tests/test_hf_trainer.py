"""TrainingRun.from_hf_trainer on a real Hugging Face Trainer run (tiny GPT-2 from a config, CPU, seconds)."""
import json
import math

import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast.io import load_state_dict

from _models import MappingItems, TokenDataset, padded_tokens, tiny_gpt2

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own dependency


def _train(tmp_path, **kwargs):
    model = tiny_gpt2(torch.float32)
    data = TokenDataset(*padded_tokens(n=16))
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12, save_steps=4,
                    logging_steps=1, learning_rate=0.01, warmup_steps=2, lr_scheduler_type="cosine", report_to=[],
                    use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=1e9)  # clipping: its own test
    settings.update(kwargs)
    transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data).train()
    return model, data, tmp_path / "out"


# warmup 0 → 0.01 over 2 updates, then cosine to 0 over 10
SCHEDULE = [0.01 * k / 2 for k in range(2)] + [0.01 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 10))
                                               for k in range(2, 12)]


def test_gradient_clipping_scales_the_learning_rates(tmp_path):
    """The Trainer clips the gradient norm (at 1.0 by default): a clipped update is a step of lr · max/‖g‖. With
    every update's norm logged, the run's learning rates are scaled by those factors; with fewer logged, a clipped
    one is warned about and the schedule taken unscaled."""
    model, _, out = _train(tmp_path, optim="sgd", max_grad_norm=0.5)
    history = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    norms = {e["step"]: e["grad_norm"] for e in history if "grad_norm" in e}
    assert sorted(norms) == list(range(1, 13)) and sum(n > 0.5 for n in norms.values()) >= 3  # clipping was active
    run = sf.TrainingRun.from_hf_trainer(out)
    want = [eta * min(1.0, 0.5 / (norms[k + 1] + 1e-6)) for k, eta in enumerate(SCHEDULE)]
    assert run.lrs == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert sf.TrainingRun.from_hf_trainer(out, lr=SCHEDULE).lrs == pytest.approx(SCHEDULE)  # lr= taken as given

    _, _, sparse = _train(tmp_path / "sparse", optim="sgd", max_grad_norm=0.5, logging_steps=3)
    with pytest.warns(RuntimeWarning, match=r"gradient clipping \(max_grad_norm=0.5\) scaled \d of the 4 updates "
                                            r"whose gradient norm the run logged, but only 4 of its 12"):
        run = sf.TrainingRun.from_hf_trainer(sparse)
    assert run.lrs == pytest.approx(SCHEDULE, rel=1e-6, abs=1e-12)


def test_adamw_run_steps_schedule_second_moments_and_weight_decay(tmp_path):
    model, data, out = _train(tmp_path, weight_decay=0.1)
    assert sf.TrainingRun.from_hf_trainer(out, model, num_segments=3).weight_decay == 0.0  # not modelled by default
    run = sf.TrainingRun.from_hf_trainer(out, model, num_segments=3, weight_decay="optimizer")
    assert run.steps == [4, 8, 12] and run.optimizer == "adamw" and run.momentum == 0.0
    assert [p.rsplit("/", 1)[-1] for p in run.checkpoints] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    # the schedule: warmup 0 → 0.01 over 2 updates, then cosine to 0 over 10; every update logged
    want = SCHEDULE
    assert run.lrs == pytest.approx(want, rel=1e-6, abs=1e-12)
    log = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    assert [e["learning_rate"] for e in log if "learning_rate" in e] == pytest.approx(want, rel=1e-5)
    # v̂ of a named parameter, by hand from optimizer.pt (the Trainer's groups: decay, then no decay)
    saved = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    decay = transformers.Trainer.get_decay_parameter_names(None, model)
    order = [n for n, _ in model.named_parameters() if n in decay] + \
        [n for n, _ in model.named_parameters() if n not in decay]
    index = order.index("transformer.h.0.mlp.c_fc.weight")
    entry = saved["state"][index]
    torch.testing.assert_close(run.adam_second_moments[1]["transformer.h.0.mlp.c_fc.weight"],
                               entry["exp_avg_sq"] / (1 - 0.999 ** float(entry["step"])))
    assert run.adam_eps == 1e-8
    torch.testing.assert_close(run.adam_second_moments[2]["lm_head.weight"],  # tied: one parameter, two names
                               run.adam_second_moments[2]["transformer.wte.weight"], rtol=0, atol=0)
    # the Trainer's groups: 0.1 on the decay parameters (tied aliases too), 0 on biases and LayerNorm weights
    assert {n: v for n, v in run.weight_decay.items() if v > 0} == {**{n: 0.1 for n in decay}, "lm_head.weight": 0.1}
    assert run.weight_decay["transformer.h.0.mlp.c_fc.bias"] == 0.0 and run.weight_decay["transformer.ln_f.weight"] == 0
    # scores from the directories, as from the same pieces given by hand
    states = [load_state_dict(p) for p in run.checkpoints]
    by_hand = sf.TrainingRun(states, [4, 8, 12], want, optimizer="adamw", adam_second_moments=run.adam_second_moments,
                             num_segments=3, weight_decay={n: 0.1 for n in [*decay, "lm_head.weight"]})
    task = sf.CausalLMTask([n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    queries = Subset(data, range(3))
    got = sf.SourceAnalyzer(model, task, run, batch_size=8, progress=False).pairwise_scores(queries, data)
    expected = sf.SourceAnalyzer(model, task, by_hand, batch_size=8, progress=False).pairwise_scores(queries, data)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert bool(torch.isfinite(got).all()) and got.abs().max() > 0


def test_sgd_momentum_run(tmp_path):
    model, _, out = _train(tmp_path, optim="sgd", optim_args="momentum=0.9")
    run = sf.TrainingRun.from_hf_trainer(out, num_segments=[6])  # SGD needs no model; explicit boundaries
    assert run.optimizer == "sgd" and run.momentum == 0.9 and run.steps == [4, 8, 12]
    assert len(run.segments) == 2 and run.lrs[2] == pytest.approx(0.01) and run.weight_decay == 0.0


def test_gradient_accumulation_counts_updates(tmp_path):
    """With gradient_accumulation_steps = 2 a step is an optimizer update of two micro-batches: the steps, schedule
    and checkpoints are the updates'."""
    _, _, out = _train(tmp_path, optim="sgd", gradient_accumulation_steps=2)
    run = sf.TrainingRun.from_hf_trainer(out)
    assert run.steps == [4, 8, 12] and run.lrs == pytest.approx(SCHEDULE, rel=1e-6, abs=1e-12)


def test_sgd_weight_decay_groups_need_the_model(tmp_path):
    """The Trainer's SGD with weight decay, read with weight_decay="optimizer": its decay group and its no-decay group
    differ, so naming them takes the model; the groups are read into a per-parameter weight decay."""
    model, _, out = _train(tmp_path, optim="sgd", optim_args="momentum=0.9", weight_decay=0.05)
    assert sf.TrainingRun.from_hf_trainer(out).weight_decay == 0.0  # not modelled by default: no names needed
    with pytest.raises(ValueError, match=r"parameter groups with different weight decays \[0.05, 0.0\] needs the "
                                         r"model"):
        sf.TrainingRun.from_hf_trainer(out, weight_decay="optimizer")
    with pytest.raises(ValueError, match="weight_decay must be None, 'optimizer', a number or a mapping, got 'adamw'"):
        sf.TrainingRun.from_hf_trainer(out, weight_decay="adamw")
    assert sf.TrainingRun.from_hf_trainer(out, weight_decay=0.05).weight_decay == 0.05  # as given
    run = sf.TrainingRun.from_hf_trainer(out, model, weight_decay="optimizer")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert run.weight_decay == {n: 0.05 if n in decay or n == "lm_head.weight" else 0.0
                                for n, _ in model.named_parameters(remove_duplicate=False)}


def test_groups_at_their_own_rates_become_lr_scale(tmp_path):
    """Parameter groups whose rates are constant multiples of the schedule (the Trainer's scheduler scales every
    group alike) are read as each parameter's lr_scale; a multiple that moves between checkpoints is named."""
    model, _, out = _train(tmp_path, max_steps=6, save_steps=2)
    dirs = sorted(out.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    for directory in dirs:
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        saved["param_groups"][1]["lr"] *= 0.5
        torch.save(saved, directory / "optimizer.pt")
    run = sf.TrainingRun.from_hf_trainer(out, model, num_segments=3)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert {n for n, v in run.lr_scale.items() if v == pytest.approx(0.5)} == \
        {n for n, p in model.named_parameters() if p.requires_grad and n not in decay}
    assert all(v == pytest.approx(1.0) for n, v in run.lr_scale.items() if n in decay)
    saved = torch.load(dirs[1] / "optimizer.pt", weights_only=True)
    saved["param_groups"][1]["lr"] *= 1.4  # now 0.7 × the schedule at this checkpoint, 0.5 × at the others
    torch.save(saved, dirs[1] / "optimizer.pt")
    with pytest.raises(ValueError, match=r"parameter group 1 holds lr .* at an earlier checkpoint: not the Trainer's"):
        sf.TrainingRun.from_hf_trainer(out, model, num_segments=3)
    assert list(sf.TrainingRun.from_hf_trainer(out, model, lr=0.01, num_segments=3).lrs) == [0.01] * 6  # by hand


def test_a_custom_optimizer_with_named_groups(tmp_path):
    """A Trainer given its own AdamW built from named parameters, the attention at 0.01 and the rest at 0.004
    (layer-wise rates): the optimizer saves the names, so its groups are read as they are (not the Trainer's
    grouping), each parameter's ratio to the schedule becomes its lr_scale, and the scores are those of the run
    built by hand."""
    model = tiny_gpt2(torch.float32)
    data = TokenDataset(*padded_tokens(n=16))
    named = [(n, p) for n, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [(n, p) for n, p in named if ".attn." in n], "lr": 0.01},
                                   {"params": [(n, p) for n, p in named if ".attn." not in n], "lr": 0.004}],
                                  weight_decay=0.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=6, save_steps=2, logging_steps=1, learning_rate=0.01,
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=1e9)
    transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    run = sf.TrainingRun.from_hf_trainer(tmp_path / "out", model, num_segments=3)
    assert run.optimizer == "adamw" and run.lrs == pytest.approx([0.01 * (1 - k / 6) for k in range(6)])
    assert run.lr_scale == pytest.approx({n: 1.0 if ".attn." in n else 0.4 for n, _ in named} |
                                         {"lm_head.weight": 0.4})  # tied to transformer.wte.weight
    task = sf.CausalLMTask([n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    by_hand = sf.TrainingRun([load_state_dict(p) for p in run.checkpoints], run.steps, list(run.lrs),
                             num_segments=3, optimizer="adamw", adam_second_moments=run.adam_second_moments,
                             lr_scale=run.lr_scale)
    queries = Subset(data, range(3))
    got = sf.SourceAnalyzer(model, task, run, batch_size=8, progress=False).pairwise_scores(queries, data)
    want = sf.SourceAnalyzer(model, task, by_hand, batch_size=8, progress=False).pairwise_scores(queries, data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    plain = sf.TrainingRun(by_hand.checkpoints, run.steps, list(run.lrs), num_segments=3, optimizer="adamw",
                           adam_second_moments=run.adam_second_moments)
    assert not torch.allclose(got, sf.SourceAnalyzer(model, task, plain, batch_size=8,
                                                     progress=False).pairwise_scores(queries, data), rtol=1e-3)


def test_a_schedule_that_is_not_the_trainers_is_named(tmp_path):
    model, _, out = _train(tmp_path)
    state_path = out / "checkpoint-12" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][5]["learning_rate"] *= 2  # as if a custom scheduler had run
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"learning rate logged at step 6 .* is not the rebuilt schedule's"):
        sf.TrainingRun.from_hf_trainer(out, model)
    run = sf.TrainingRun.from_hf_trainer(out, model, lr=0.01)  # given by hand: taken as it is
    assert list(run.lrs) == [0.01] * 12


def test_an_adam_state_that_is_not_torchs_is_named(tmp_path):
    """bitsandbytes' 8-bit Adam (optim="adamw_bnb_8bit") keeps quantised state1/state2, not exp_avg_sq: named."""
    model, _, out = _train(tmp_path, max_steps=4, save_steps=2)
    for directory in sorted(out.glob("checkpoint-*")):
        saved = torch.load(directory / "optimizer.pt", weights_only=True)
        for entry in saved["state"].values():
            entry["state2"] = entry.pop("exp_avg_sq")
        torch.save(saved, directory / "optimizer.pt")
    with pytest.raises(ValueError, match=r"state holds \['exp_avg', 'state2', 'step'\], not torch Adam's "
                                         r"exp_avg_sq and step"):
        sf.TrainingRun.from_hf_trainer(out, model)


def test_not_a_trainer_output_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-<step> directories"):
        sf.TrainingRun.from_hf_trainer(tmp_path)


def test_a_fine_tuned_sequence_classifier_end_to_end(tmp_path):
    """Trainer fine-tunes a BERT classifier (AdamW, linear schedule) on mapping batches; its output_dir gives the
    run, sf.ClassificationTask reads the same batches: SOURCE scores and self-influence come out finite."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    ids, mask = padded_tokens(n=16, lengths=(2, 6))
    items = MappingItems(input_ids=ids, attention_mask=mask,
                         labels=torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1)))

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=8, save_steps=2, logging_steps=3, learning_rate=1e-3,
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=items).train()
    run = sf.TrainingRun.from_hf_trainer(tmp_path / "out", model, num_segments=2)
    assert run.steps == [2, 4, 6, 8] and run.optimizer == "adamw"
    analyzer = sf.SourceAnalyzer(model, sf.ClassificationTask(), run, batch_size=8, progress=False)
    scores = analyzer.pairwise_scores(Subset(items, range(3)), items)
    assert scores.shape == (3, 16) and bool(torch.isfinite(scores).all())
    assert bool(torch.isfinite(analyzer.self_scores(items)).all())


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers' own
def test_a_lora_fine_tune_from_its_adapter_checkpoints(tmp_path):
    """Trainer on a PEFT LoRA model: its checkpoint directories hold the adapter only. from_hf_trainer names the
    adapters' v̂ (the optimizer's only parameters); the analyzer tracks the adapters (the base is frozen) and reads
    the adapter checkpoints against the model: the same scores as from the full state_dicts."""
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, r=2,
                                                      init_lora_weights=False))
    data = TokenDataset(*padded_tokens(n=16))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=6, save_steps=3, logging_steps=1, learning_rate=0.01,
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert (tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "checkpoint-3" / "model.safetensors").exists()
    run = sf.TrainingRun.from_hf_trainer(tmp_path / "out", model, num_segments=2)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert run.optimizer == "adamw" and sorted(run.adam_second_moments[1]) == sorted(lora)
    analyzer = sf.SourceAnalyzer(model, sf.CausalLMTask(), run, batch_size=8, progress=False)
    assert [layer.name for layer in analyzer.layers] == [n.removesuffix(".weight") for n in lora]
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    full = [{k: v.clone() for k, v in model.state_dict().items()} for _ in run.checkpoints]
    for state, directory in zip(full, run.checkpoints):  # the full state_dicts of the same checkpoints
        adapter = load_state_dict(directory)
        for key in list(state):
            saved = key.replace(".default.", ".")
            if saved in adapter:
                state[key] = adapter[saved]
    by_hand = sf.TrainingRun(full, run.steps, list(run.lrs), optimizer="adamw",
                             adam_second_moments=run.adam_second_moments, num_segments=2)
    expected = sf.SourceAnalyzer(model, sf.CausalLMTask(), by_hand, batch_size=8,
                                 progress=False).pairwise_scores(queries, data)
    assert torch.equal(scores, expected) and bool(torch.isfinite(scores).all())
