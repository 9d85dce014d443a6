"""The ready-made tasks (sf.ClassificationTask, sf.RegressionTask, sf.CausalLMTask): their losses, their sampled labels (the same
draws from compute_train_loss(sample=True) and compute_train_loss_pair), and SOURCE end to end with them."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import (LM_VOCAB, MappingItems, TokenDataset, classification_data, lm_checkpoints, mlp, padded_tokens,
                     tiny_gpt2, train_run)


def _seeded(fn, seed=3):
    torch.manual_seed(seed)
    return fn()


def test_classification_task_losses_and_paired_draws():
    data = classification_data(n=12)
    model = mlp()
    x, y = data.tensors
    task = sf.ClassificationTask()
    logits = model(x)
    want = F.cross_entropy(logits, y, reduction="sum")
    assert torch.allclose(task.compute_train_loss((x, y), model), want, rtol=1e-13)
    assert torch.allclose(task.compute_measurement((x, y), model), want, rtol=1e-13)
    sampled = _seeded(lambda: task.compute_train_loss((x, y), model, sample=True))
    pair = _seeded(lambda: task.compute_train_loss_pair((x, y), model))
    assert torch.equal(sampled, pair[0]) and torch.allclose(pair[1], want, rtol=1e-13)
    drawn = _seeded(lambda: sf.sample_labels(logits.detach()))
    assert torch.allclose(sampled, F.cross_entropy(logits, drawn, reduction="sum"), rtol=1e-13)
    assert task.get_influence_tracked_modules() is None
    assert sf.ClassificationTask(["0"]).get_influence_tracked_modules() == ["0"]


@pytest.mark.parametrize("batch,err,match", [
    ({"x": 1}, TypeError, r"\(inputs, targets\) batches"),
    ((torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)), ValueError, "targets \\[batch\\]"),
])
def test_classification_task_names_a_bad_batch(batch, err, match):
    with pytest.raises(err, match=match):
        sf.ClassificationTask().compute_train_loss(batch, mlp())


def test_classification_task_end_to_end_one_pass_equals_fit_then_scores():
    data = classification_data(n=24)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=20, every=5, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(4))
    task = sf.ClassificationTask()
    two = sf.SourceAnalyzer(model, task, run, batch_size=7, progress=False)
    two.fit(data)
    one = sf.SourceAnalyzer(model, task, run, batch_size=7, progress=False).pairwise_scores(queries, data)
    want = two.pairwise_scores(queries, data)
    assert torch.allclose(one, want, rtol=1e-12, atol=1e-14 * want.abs().max().item())


def _regression_run(n=20, d_in=4, d_out=2, steps=12, every=3, lr=0.1):
    """Full-batch SGD on the mean over examples of ½‖f − y‖² (RegressionTask's per-example loss, so loss_scale
    1): (model, data, run)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, d_out, generator=gen,
                                                                                             dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, y)
    model = mlp(d_in=d_in, d_out=d_out)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ckpts, ckpt_steps = [], []
    for k in range(steps):
        opt.zero_grad()
        (0.5 * (model(x) - y).square().sum() / n).backward()
        opt.step()
        if (k + 1) % every == 0:
            ckpts.append({key: v.detach().clone() for key, v in model.state_dict().items()})
            ckpt_steps.append(k + 1)
    return model, data, sf.TrainingRun(ckpts, ckpt_steps, lr=lr, num_segments=2)


def test_regression_task_losses_and_paired_draws():
    model, data, _ = _regression_run()
    x, y = data.tensors
    task = sf.RegressionTask()
    pred = model(x)
    want = 0.5 * (pred - y).square().sum()
    assert torch.equal(task.compute_train_loss((x, y), model), want)
    assert torch.equal(task.compute_measurement((x, y), model), want)
    sampled = _seeded(lambda: task.compute_train_loss((x, y), model, sample=True))
    pair = _seeded(lambda: task.compute_train_loss_pair((x, y), model))
    assert torch.equal(sampled, pair[0]) and torch.equal(pair[1], want)
    noise = _seeded(lambda: torch.randn_like(pred))  # y ~ N(f, 1): the loss is ½‖ε‖²
    assert torch.allclose(sampled, 0.5 * noise.square().sum(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"predictions of the targets' shape \(20, 3\)"):
        task.compute_train_loss((x, torch.zeros(20, 3, dtype=torch.float64)), model)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) batches"):
        task.compute_train_loss({"x": x}, model)


def test_regression_task_end_to_end_matches_dense_oracle_and_one_pass():
    model, data, run = _regression_run()
    task = sf.RegressionTask()
    queries = Subset(data, range(4))
    empirical = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=6,
                                  progress=False).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data)
    assert ((empirical - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
    two = sf.SourceAnalyzer(model, task, run, batch_size=6, progress=False)
    two.fit(data)
    want = two.pairwise_scores(queries, data)
    one = sf.SourceAnalyzer(model, task, run, batch_size=6, progress=False).pairwise_scores(queries, data)
    assert torch.allclose(one, want, rtol=1e-12, atol=1e-14 * want.abs().max().item())


transformers = pytest.importorskip("transformers")
VOCAB = LM_VOCAB


def _gpt2(dtype=torch.float64):
    return tiny_gpt2(dtype)


def test_causal_lm_task_losses_default_labels_and_paired_draws():
    model = _gpt2()
    ids, mask = padded_tokens()
    batch = {"input_ids": ids, "attention_mask": mask}
    task = sf.CausalLMTask()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]  # padded positions are not predicted
    want = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(task.compute_train_loss(batch, model), want, rtol=1e-12)
    explicit = {**batch, "labels": ids.masked_fill(mask == 0, -100)}
    assert torch.allclose(task.compute_measurement(explicit, model), want, rtol=1e-12)
    sampled = _seeded(lambda: task.compute_train_loss(batch, model, sample=True))
    pair = _seeded(lambda: task.compute_train_loss_pair(batch, model))
    assert torch.equal(sampled, pair[0]) and torch.allclose(pair[1], want, rtol=1e-12)
    # Labels are drawn at the predicted positions only (one draw per position of the full logits, the last
    # position's discarded): the sampled loss sums exactly those terms.
    full = model(input_ids=ids, attention_mask=mask).logits.detach()
    drawn = _seeded(lambda: sf.sample_labels(full.reshape(-1, VOCAB))).view(ids.shape)[:, :-1]
    drawn = drawn.masked_fill(labels == -100, -100)
    assert torch.allclose(sampled, F.cross_entropy(logits.reshape(-1, VOCAB), drawn.reshape(-1), ignore_index=-100,
                                                   reduction="sum"), rtol=1e-12)
    assert torch.equal(task.get_attention_mask(batch), mask)
    with pytest.raises(TypeError, match="'input_ids'"):
        task.compute_train_loss((ids, mask), model)


def _lm_run(model, data):
    ckpts, steps = lm_checkpoints(model, data, sf.CausalLMTask())
    return sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)


def test_causal_lm_task_matches_dense_oracle_with_padding():
    model = _gpt2()
    data = TokenDataset(*padded_tokens(), with_labels=False)
    run = _lm_run(model, data)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = sf.CausalLMTask(names)
    queries = Subset(data, range(3))
    scores = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=4,
                               progress=False).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6


def test_causal_lm_task_sampled_fisher_one_pass_equals_fit_then_scores():
    model = _gpt2()
    data = TokenDataset(*padded_tokens(seed=1), with_labels=False)
    run = _lm_run(model, data)
    task = sf.CausalLMTask()  # every supported module, lm_head included
    queries = Subset(data, range(3))
    two = sf.SourceAnalyzer(model, task, run, batch_size=4, progress=False)
    two.fit(data)
    want = two.pairwise_scores(queries, data)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        one = sf.SourceAnalyzer(model, task, run, batch_size=4, progress=False).pairwise_scores(queries, data)
    finally:
        handle.remove()
    assert torch.allclose(one, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
    assert len(forwards) == 4 * 3 + 1  # 4 checkpoints x 3 batches of the covariance passes + the queries


def test_causal_lm_task_fused_output_layer_gives_the_same_scores():
    """fused_output_layer=True (linear_nll_pair on the base model's hidden states and lm_head's weight, no
    logits kept) against the plain task: the same losses and the same one-pass SOURCE scores; it needs
    explicit tracked modules and an nn.Linear output layer."""
    model = _gpt2()
    ids, mask = padded_tokens(seed=3)
    batch = {"input_ids": ids, "attention_mask": mask}
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    plain, fused = sf.CausalLMTask(names), sf.CausalLMTask(names, fused_output_layer=True)
    assert torch.allclose(fused.compute_train_loss(batch, model), plain.compute_train_loss(batch, model), rtol=1e-12)
    pair_f = _seeded(lambda: fused.compute_train_loss_pair(batch, model))
    pair_p = _seeded(lambda: plain.compute_train_loss_pair(batch, model))
    for f, p in zip(pair_f, pair_p):
        assert torch.allclose(f, p, rtol=1e-12)
    data = TokenDataset(ids, mask, with_labels=False)
    run = _lm_run(model, data)
    queries = Subset(data, range(3))
    scores = [sf.SourceAnalyzer(model, task, run, batch_size=4, progress=False).pairwise_scores(queries, data)
              for task in (fused, plain)]
    assert torch.allclose(scores[0], scores[1], rtol=1e-10, atol=1e-12 * scores[1].abs().max().item())
    with pytest.raises(ValueError, match="fused_output_layer=True\\) needs tracked_modules"):
        sf.CausalLMTask(fused_output_layer=True)


def test_classification_task_on_a_hugging_face_sequence_classifier_matches_dense_oracle():
    """A BERT classifier from a config, mapping batches with labels and right padding: every Linear tracked (the
    attention mask leaves padded tokens out of the covariances), against the dense oracle."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=LM_VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config).double()
    ids, mask = padded_tokens(n=12, lengths=(2, 6))
    data = MappingItems(input_ids=ids, attention_mask=mask,
                        labels=torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1)))
    task = sf.ClassificationTask()
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    assert torch.equal(task.get_attention_mask(batch), mask[:4])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(task.compute_train_loss(batch, model), F.cross_entropy(logits, batch["labels"],
                                                                                 reduction="sum"))
    ckpts, steps = lm_checkpoints(model, data, task, steps=6, every=2, lr=0.5)
    run = sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=3)
    queries = Subset(data, range(3))
    scores = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=5,
                               progress=False).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
    with pytest.raises(TypeError, match="or a mapping with 'labels'"):
        task.compute_train_loss({"input_ids": ids}, model)


def test_causal_lm_task_token_mean_loss_scale_is_documents_over_predicted_tokens():
    ids, mask = padded_tokens(n=10)
    data = TokenDataset(ids, mask, with_labels=False)
    predicted = int((mask[:, 1:] == 1).sum())  # position t predicts token t + 1 where it is a real token
    assert sf.CausalLMTask().token_mean_loss_scale(data, batch_size=3) == pytest.approx(10 / predicted)


def test_classification_task_on_a_hugging_face_vision_transformer_matches_dense_oracle():
    """A ViT classifier from a config (its patch embedding a strided Conv2d), mapping batches of pixel_values and
    labels: every Linear and the conv tracked, against the dense oracle."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(config).double()
    gen = torch.Generator().manual_seed(2)
    data = MappingItems(pixel_values=torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64),
                        labels=torch.randint(0, 3, (12,), generator=gen))
    task = sf.ClassificationTask()
    ckpts, steps = lm_checkpoints(model, data, task, steps=4, every=2, lr=0.3)
    run = sf.TrainingRun(ckpts, steps, lr=0.3, num_segments=2)
    analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=5, progress=False)
    names = [layer.name for layer in analyzer.layers]
    assert any(name.endswith("patch_embeddings.projection") for name in names)
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, task, run, queries, data, module_names=names)
    assert ((scores - oracle).abs().max() / oracle.abs().max()).item() <= 1e-6
