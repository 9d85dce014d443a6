"""The Task protocol: how source_fast computes losses and measurements on your batches.

It follows Kronfluence's `Task` protocol, so a `kronfluence.Task` subclass works unchanged:

- ``compute_train_loss(batch, model, sample=False)``: the training loss **summed** over the batch,
  as a negative log-likelihood. With ``sample=True`` the labels are sampled from the model's
  predictive distribution (the true Fisher / GGN, so the curvature is PSD); source_fast seeds
  the RNG around this call. If your optimiser stepped on a rescaled loss (a mean over examples is
  handled by 1/N already; a mean over tokens, or MSE = 2 × Gaussian NLL, is not), tell
  `TrainingRun(loss_scale=...)`.
- ``compute_measurement(batch, model)``: the query measurement f, summed over the batch
  (e.g. the loss, or a margin).
- ``get_influence_tracked_modules()``: optional list of module names to track (default: every
  supported module: nn.Linear, nn.Conv1d, nn.Conv2d, transformers' Conv1D).
- ``get_attention_mask(batch)``: optional ``[batch, tokens]`` mask; masked tokens do not enter the
  activation covariance.
- ``compute_train_loss_pair(batch, model)``: optional (a source_fast extension): the sampled-label and
  the true-label training loss from **one** forward pass, ``(sampled, true)``. With it, a SOURCE run that
  calls ``pairwise_scores`` without a prior ``fit`` takes the training-set gradients it scores against
  from the same forward passes as the curvature (one forward per checkpoint instead of two). Draw the
  labels exactly as ``compute_train_loss(sample=True)`` does: source_fast seeds the RNG around both
  calls the same way, so the fit is bitwise the same whichever method ran.

``sample_labels(logits)`` draws the Fisher's labels quickly (see its docstring); ``nll_pair(logits, labels)``
gives the sampled-label and the true-label loss from one softmax, with a one-pass backward.

Ready-made tasks: `ClassificationTask` (``(inputs, targets)`` batches, logits ``[B, C]``),
`RegressionTask` (``(inputs, targets)`` batches, unit-variance Gaussian NLL) and `CausalLMTask` (Hugging
Face-style causal LMs: mapping batches with ``input_ids``), all with ``compute_train_loss_pair``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import _linalg
from ._validation import check_same_device


class Task:
    """Base class with the same methods as ``kronfluence.Task``; subclass it and implement the two
    compute methods."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError("Task.compute_train_loss(batch, model, sample=False) must be implemented")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError("Task.compute_measurement(batch, model) must be implemented")

    def get_influence_tracked_modules(self) -> list[str] | None:
        return None

    def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
        return None

    # Optional: compute_train_loss_pair(batch, model) -> (sampled_loss, true_loss) from one forward pass.
    # Not defined here on purpose: source_fast uses it only where a task defines it (see the module doc).


class _ReadyMadeTask(Task):
    """What the ready-made tasks share: the tracked modules they are given, the training loss as
    measurement, and the (inputs, targets) batch check."""

    def __init__(self, tracked_modules: list[str] | None = None):
        self.tracked_modules = None if tracked_modules is None else list(tracked_modules)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked_modules

    def _inputs_targets(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{type(self).__name__} expects (inputs, targets) batches, got {type(batch).__name__}")
        return batch


class ClassificationTask(_ReadyMadeTask):
    """Ready-made task for ``(inputs, targets)`` batches and a model returning logits ``[B, C]``: the
    summed cross-entropy, as training and measurement loss, by `nll_pair` (sampled labels as
    `sample_labels` draws them); `compute_train_loss_pair` gives both losses from one forward (one pass per
    checkpoint).

    Hugging Face-style batches work too: a mapping with ``labels`` (``[B]``) and the model's other inputs
    (``input_ids``, ``attention_mask``, ...), for a model called as ``model(**inputs)`` whose output has
    ``.logits`` (``AutoModelForSequenceClassification``); its ``attention_mask`` is the task's, so padded tokens
    leave the activation covariances. A Trainer's mean cross-entropy is this loss per example:
    ``TrainingRun.from_hf_trainer``'s default ``loss_scale=1`` fits.

    Args:
        tracked_modules: module names to attribute through (default: every supported module that trained).
    """

    def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
        return batch.get("attention_mask") if isinstance(batch, Mapping) else None

    def _logits_and_targets(self, batch, model):
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise TypeError(f"ClassificationTask expects (inputs, targets) batches or a mapping with 'labels' "
                                f"beside the model's inputs, got a mapping with keys {sorted(batch)}")
            targets = batch["labels"]
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits = getattr(out, "logits", out)
        else:
            inputs, targets = self._inputs_targets(batch)
            logits = model(inputs)
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"ClassificationTask expects logits [batch, classes] and targets [batch], got logits "
                             f"{tuple(logits.shape)} and targets {tuple(targets.shape)}")
        return logits, targets

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        sampled, true = nll_pair(*self._logits_and_targets(batch, model), sampled=sample)
        return sampled if sample else true

    def compute_train_loss_pair(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return nll_pair(*self._logits_and_targets(batch, model))


class RegressionTask(_ReadyMadeTask):
    """Ready-made task for ``(inputs, targets)`` batches and a model whose output has the targets' shape:
    the Gaussian negative log-likelihood with unit variance, ``½ Σ (f − y)²`` summed over the batch (constants
    dropped), as training and measurement loss. Sampled targets (the true Fisher) are ``y ~ N(f, 1)``;
    `compute_train_loss_pair` gives both losses from one forward (one pass per checkpoint).

    An optimiser that stepped on the summed squared error ``Σ (f − y)²`` stepped on twice this loss: say so
    with ``TrainingRun(loss_scale=2)`` (a mean over examples is already handled by 1/N).

    Args:
        tracked_modules: module names to attribute through (default: every supported module that trained).
    """

    def _predictions_and_targets(self, batch, model):
        inputs, targets = self._inputs_targets(batch)
        pred = model(inputs)
        if not isinstance(pred, torch.Tensor) or pred.shape != targets.shape:
            raise ValueError(f"RegressionTask expects predictions of the targets' shape {tuple(targets.shape)}, got "
                             f"{tuple(getattr(pred, 'shape', ()))}")
        return pred, targets

    @staticmethod
    def _sampled(pred):
        with torch.no_grad():  # y ~ N(f, 1), from the global RNG (which source_fast seeds)
            return pred.detach() + torch.randn_like(pred)

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        pred, targets = self._predictions_and_targets(batch, model)
        return 0.5 * (pred - (self._sampled(pred) if sample else targets)).square().sum()

    def compute_train_loss_pair(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        pred, targets = self._predictions_and_targets(batch, model)
        return 0.5 * (pred - self._sampled(pred)).square().sum(), 0.5 * (pred - targets).square().sum()


class CausalLMTask(_ReadyMadeTask):
    """Ready-made task for causal language models called like Hugging Face's
    (``model(input_ids=..., attention_mask=...).logits`` of shape ``[B, T, V]``): the next-token negative
    log-likelihood summed over the predicted tokens of the batch, as training and measurement loss.

    Batches are mappings with ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` (1 = a real
    token; default all ones) and optional ``labels`` ``[B, T]`` (``-100`` = not predicted; default: the
    input ids where the attention mask is 1). Position t's logits predict labels[t + 1]. Losses by
    `nll_pair`; sampled labels (the true Fisher) are drawn as `sample_labels` draws them, at the predicted
    positions only; `compute_train_loss_pair` gives both losses from one forward (one pass per
    checkpoint). The activation covariance counts the positions of the attention mask.

    Args:
        tracked_modules: module names to attribute through (default: every supported module that trained, which for
            a Hugging Face LM includes ``lm_head``).
        fused_output_layer: compute the losses from the base model's last hidden states and the output
            layer's weight with `linear_nll_pair`, never keeping the logits (for large vocabularies). Only for
            models whose logits are exactly ``get_output_embeddings()(base_model(...)[0])`` (GPT-2, Llama,
            Mistral, Qwen, ...; not models that rescale or soft-cap their logits). Needs an explicit
            `tracked_modules` without the output layer, which is then never called as a module.
    """

    ignore_index = -100

    def __init__(self, tracked_modules: list[str] | None = None, *, fused_output_layer: bool = False):
        if fused_output_layer and tracked_modules is None:
            raise ValueError("CausalLMTask(fused_output_layer=True) needs tracked_modules: the default tracks every "
                             "supported module, the output layer included, which the fused loss never calls")
        super().__init__(tracked_modules)
        self.fused_output_layer = fused_output_layer

    def _ids_mask_labels(self, batch):
        if not hasattr(batch, "keys") or "input_ids" not in batch:
            raise TypeError(f"CausalLMTask expects mapping batches with 'input_ids', got {type(batch).__name__}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, self.ignore_index)
        # Position t predicts labels[t + 1]; the last position predicts nothing. Shifting the labels rather
        # than slicing the logits keeps the logits' gradient one tensor (no zero-filled copy in backward).
        shifted = torch.full_like(labels, self.ignore_index)
        shifted[:, :-1] = labels[:, 1:]
        return ids, mask, shifted

    def _losses(self, batch, model, sampled: bool):
        ids, mask, labels = self._ids_mask_labels(batch)
        if self.fused_output_layer:
            head = model.get_output_embeddings()
            if not isinstance(head, nn.Linear):
                raise TypeError(f"CausalLMTask(fused_output_layer=True) needs an nn.Linear output layer "
                                f"(model.get_output_embeddings()), got {type(head).__name__}")
            hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]
            if hidden.shape[:2] != ids.shape:
                raise ValueError(f"CausalLMTask expects hidden states [batch, tokens, H] matching input_ids "
                                 f"{tuple(ids.shape)}, got {tuple(hidden.shape)}")
            return linear_nll_pair(hidden, head.weight, labels, bias=head.bias, sampled=sampled,
                                   ignore_index=self.ignore_index)
        logits = model(input_ids=ids, attention_mask=mask).logits
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"CausalLMTask expects logits [batch, tokens, vocab] matching input_ids "
                             f"{tuple(ids.shape)}, got {tuple(logits.shape)}")
        return nll_pair(logits, labels, sampled=sampled, ignore_index=self.ignore_index)

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        sampled, true = self._losses(batch, model, sampled=sample)
        return sampled if sample else true

    def compute_train_loss_pair(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._losses(batch, model, sampled=True)

    def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
        return batch.get("attention_mask") if hasattr(batch, "get") else None

    def token_mean_loss_scale(self, dataset, batch_size: int = 64) -> float:
        """`TrainingRun`'s ``loss_scale`` for a run that stepped on the mean over the batch's predicted tokens (a
        Hugging Face Trainer's causal-LM loss): this task's loss sums a document's tokens, so the optimiser's
        per-example loss is B / (predicted tokens in the batch) times it, taken here as its dataset mean,
        documents / predicted tokens (exact when every batch has the mean number of tokens per document)."""
        from torch.utils.data import DataLoader

        documents = predicted = 0
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            _, _, labels = self._ids_mask_labels(batch)
            documents += labels.shape[0]
            predicted += int((labels != self.ignore_index).sum())
        if predicted == 0:
            raise ValueError("token_mean_loss_scale: the dataset has no predicted tokens")
        return documents / predicted


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one label per row from softmax(logits) (for ``compute_train_loss(..., sample=True)``).

    The same distribution as ``torch.multinomial(logits.softmax(-1), 1)``, by a two-level inverse CDF:
    one uniform number per row picks a block of ≈ √C classes by the blocks' cumulative masses, then a
    class inside it. On a CPU (2 threads, 64 × 39 rows of a 1000-way vocabulary) it takes 1.2–1.5 ms,
    against 45 ms for ``torch.multinomial`` and 6.9 ms for one cumulative sum over all classes, which otherwise
    dominate a true-Fisher pass of a small language model. Returns int64 labels of shape
    ``logits.shape[:-1]``; uses the global RNG (which source_fast seeds) unless `generator`. A class of
    zero probability (logit −inf) is never drawn.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a tensor [..., classes] with at least one class, got "
                         f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    return _draw(_softmax(logits.detach().to(_float_dtype(logits))), generator)


def _float_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension: the one place `sample_labels` and `nll_pair` take their masses from,
    so both draw bitwise the same labels from the same RNG state."""
    return torch.softmax(x, -1)


def _draw(mass: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One class per row of `mass` [..., C] (probabilities, or any positive multiple of them per row) by
    `sample_labels`' two-level inverse CDF."""
    classes = mass.shape[-1]
    width = _block_width(classes)
    pad = -classes % width
    if pad:
        mass = torch.nn.functional.pad(mass, (0, pad))  # zero mass: never reached
    blocks = mass.unflatten(-1, (-1, width))  # [..., blocks, width]
    block_cdf = blocks.sum(-1).cumsum_(-1)
    total = block_cdf[..., -1:]
    u = torch.rand(total.shape, dtype=mass.dtype, device=mass.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: a block with mass
    block = torch.searchsorted(block_cdf, u, right=True)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), torch.zeros_like(u))
    inner = blocks.gather(-2, block.unsqueeze(-1).expand(*block.shape, width)).squeeze(-2).cumsum_(-1)
    # Rounding can put u − before at or past the block's own total: keep it strictly below, so the class
    # found has inner[j] > inner[j − 1], i.e. positive mass.
    last = inner[..., -1:]
    rest = torch.minimum(u - before, torch.nextafter(last, torch.zeros_like(last)))
    within = torch.searchsorted(inner, rest, right=True)
    return (block * width + within).squeeze(-1)


def nll_pair(logits: torch.Tensor, labels: torch.Tensor, *, sampled: bool = True, ignore_index: int = -100,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampled-label and the true-label negative log-likelihood of `logits`, each summed over rows,
    from one softmax: ``(sampled, true)``, for ``compute_train_loss_pair`` (``sampled=False``: ``(None, true)``,
    for ``compute_train_loss(sample=False)``, drawing nothing).

    Same values and gradients as ``F.cross_entropy(logits, y, ignore_index=..., reduction="sum")`` with y the
    labels drawn by `sample_labels` (the same draws, from the same RNG) and y = `labels`. Faster, because the
    two losses and the sampler share one softmax of the logits, and each backward writes ``softmax − onehot``
    in one pass instead of cross-entropy's zero fill, scatter and log-softmax backward (on a small causal LM
    with a 1,000-way vocabulary the logits' passes are most of the loss's cost). Labels are drawn only where
    `labels` is not `ignore_index`.

    Args:
        logits: ``[..., C]`` floating point; fp16/bf16 are computed in fp32 and the gradient cast back.
        labels: integer ``logits.shape[:-1]``: the true labels, `ignore_index` where a row is not scored.

    Returns:
        Two scalar losses in float32 (float64 for float64 logits); their backward gives the logits'
        gradient in the logits' dtype.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a tensor [..., classes] with at least one class, got "
                         f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    _check_labels_shape(labels, logits.shape[:-1], "logits")
    check_same_device(logits=logits, labels=labels)
    classes = logits.shape[-1]
    x = logits.detach().to(_float_dtype(logits)).reshape(-1, classes)
    labels, valid = _flat_labels(labels, classes, ignore_index)
    with torch.no_grad():
        prob = _softmax(x)  # shared by the draws, both losses and both backwards
        drawn = _draw(prob, generator).masked_fill_(~valid, ignore_index) if sampled else None
    true = _NllFromSoftmax.apply(logits, x, prob, labels, valid)
    return (_NllFromSoftmax.apply(logits, x, prob, drawn, valid) if sampled else None), true


class _NllFromSoftmax(torch.autograd.Function):
    """Σ_rows −log softmax(x)[label] over the `valid` rows, given prob = softmax(x), with the backward
    ``(prob − onehot(label)) · grad`` written in one pass."""

    @staticmethod
    def forward(ctx, logits, x, prob, labels, valid):
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        nll = _nll_rows(x, prob, safe, valid, host_sync=x.device.type == "cpu")
        ctx.save_for_backward(prob, safe, valid)
        ctx.logits_meta = (logits.shape, logits.dtype)
        return torch.where(valid, nll, torch.zeros_like(nll)).sum()

    @staticmethod
    def backward(ctx, grad):
        prob, safe, valid = ctx.saved_tensors
        shape, dtype = ctx.logits_meta
        weight = valid.to(prob.dtype) * grad.to(prob.dtype)
        out = prob * weight[:, None]
        out.scatter_add_(1, safe[:, None], -weight[:, None])
        return out.view(shape).to(dtype), None, None, None, None


def linear_nll_pair(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, sampled: bool = True, ignore_index: int = -100,
                    generator: torch.Generator | None = None,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`nll_pair` of the logits ``hidden @ weightᵀ + bias`` (a language model's output layer) without keeping
    the logits: ``(sampled, true)`` losses whose backward reaches `hidden` only.

    The logits are formed in chunks of rows. Each chunk gives both losses, the draws and the gradient with
    respect to `hidden` of both losses: ``dh_sampled = (softmax − onehot(drawn)) @ weight``, and
    ``dh_true = dh_sampled + weight[drawn] − weight[true]`` (the two losses differ only in the onehot). So
    the output layer costs one product backward instead of two, and memory holds one chunk of logits
    instead of the logits and their two gradients. Use it in a Task's ``compute_train_loss_pair`` when the
    output layer is not a tracked module (it is never called as a module, so it cannot be). `weight` and
    `bias` get no gradient: this is a loss for attribution, not for training.

    Args:
        hidden: ``[..., H]`` inputs of the output layer (the last hidden states).
        weight: ``[C, H]`` output-layer weight; bias: optional ``[C]``.
        labels: integer ``hidden.shape[:-1]``; `ignore_index` where a row is not scored.
        chunk_rows: rows per chunk (default: ≈ 64 MiB of fp32 logits per chunk).
    Returns:
        Two scalar losses in float32 (float64 for float64 inputs), as `nll_pair`. The draws come from the
        same inverse CDF as `sample_labels`; with one chunk they are its draws from the same RNG state.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor [..., H], got {type(hidden).__name__}"
                        f"{tuple(getattr(hidden, 'shape', ()))}")
    width = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be [classes, {width}] (hidden's last dimension), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    classes = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (classes,)):
        raise ValueError(f"bias must be [{classes}], got {tuple(getattr(bias, 'shape', ()))}")
    _check_labels_shape(labels, hidden.shape[:-1], "hidden")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an integer >= 1 or None, got {chunk_rows!r}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    dtype = _float_dtype(hidden)
    h = hidden.detach().to(dtype).reshape(-1, width)
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    flat, valid = _flat_labels(labels, classes, ignore_index)
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    rows = h.shape[0]
    step = chunk_rows or max(1, (64 << 20) // (4 * classes))
    nll_true = h.new_empty(rows)
    nll_sampled = h.new_empty(rows) if sampled else None
    grad_true = torch.empty_like(h)
    grad_sampled = torch.empty_like(h) if sampled else None
    host_sync = h.device.type == "cpu"
    with torch.no_grad():
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            # _linalg: on CPU the compiled GEMM (about 2x MKL's AVX2 path on AMD at 2,240 x 64 x 1,000)
            x = _linalg.matmul(h[lo:hi], w.T) if b is None else torch.addmm(b, h[lo:hi], w.T)
            prob = _softmax(x)
            ok = valid[lo:hi]
            nll_true[lo:hi] = _nll_rows(x, prob, safe[lo:hi], ok, host_sync=host_sync)
            keep = ok.to(dtype)[:, None]
            target = safe[lo:hi]  # the onehot whose gradient is formed by a product: the drawn one if any
            if sampled:
                target = torch.where(ok, _draw(prob, generator), torch.zeros_like(target))
                nll_sampled[lo:hi] = _nll_rows(x, prob, target, ok, host_sync=host_sync)
            prob.scatter_add_(1, target[:, None], -keep)  # softmax − onehot(target), in place
            prob.mul_(keep)
            _linalg.matmul(prob, w, out=(grad_sampled if sampled else grad_true)[lo:hi])
            if sampled:  # the true label's gradient differs only in the onehot
                grad_true[lo:hi] = grad_sampled[lo:hi] + keep * (w[target] - w[safe[lo:hi]])
    zero = torch.zeros((), dtype=dtype, device=h.device)
    true = _GivenGradient.apply(hidden, torch.where(valid, nll_true, zero).sum(), grad_true)
    if not sampled:
        return None, true
    return _GivenGradient.apply(hidden, torch.where(valid, nll_sampled, zero).sum(), grad_sampled), true


class _GivenGradient(torch.autograd.Function):
    """A scalar `value` of `hidden` whose gradient was computed with it: backward returns grad · gradient."""

    @staticmethod
    def forward(ctx, hidden, value, gradient):
        ctx.save_for_backward(gradient)
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        gradient, = ctx.saved_tensors
        shape, dtype = ctx.hidden_meta
        return (gradient * grad.to(gradient.dtype)).view(shape).to(dtype), None, None


def _check_labels_shape(labels, shape: torch.Size, of: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != shape or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape {of}.shape[:-1] = {tuple(shape)}, "
                         f"got {type(labels).__name__}{tuple(getattr(labels, 'shape', ()))} "
                         f"{getattr(labels, 'dtype', '')}")


def _flat_labels(labels: torch.Tensor, classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels flattened, rows that are scored). On CPU a host check names a label out of range; on a GPU it
    would stall the stream each batch, and gather's device-side bounds check catches it there, as
    F.cross_entropy's does."""
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    if flat.device.type == "cpu" and bool(((flat < 0) | (flat >= classes))[valid].any()):
        raise ValueError(f"labels must lie in [0, {classes}) or equal ignore_index={ignore_index}")
    return flat, valid


def _nll_rows(x: torch.Tensor, prob: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, *,
              host_sync: bool) -> torch.Tensor:
    """−log softmax(x)[safe] per row. −log p loses nothing while p is a normal number; below that (a label
    ≳ 87 nats less likely than the top class in fp32) rows take logsumexp − logit instead. host_sync (CPU):
    find those rare rows on the host and recompute only them; otherwise (GPU) logsumexp over every row,
    one more read of the logits but no stall of the stream."""
    picked = prob.gather(1, safe[:, None]).squeeze(1)
    nll = -picked.log()
    tiny = valid & (picked < torch.finfo(prob.dtype).tiny)
    if not host_sync:
        exact = torch.logsumexp(x, -1) - x.gather(1, safe[:, None]).squeeze(1)
        return torch.where(tiny, exact, nll)
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        nll[rows] = torch.logsumexp(x[rows], -1) - x[rows, safe[rows]]
    return nll


def _block_width(classes: int) -> int:
    """Classes per block of `sample_labels`: ≈ √C, preferably a divisor of C within a factor 2 of √C (then
    no padded copy of the masses: 1000 → 25, 32000 → 160), else √C with padding (a prime C)."""
    root = max(1, round(classes ** 0.5))
    for width in sorted(range(max(2, root // 2), 2 * root + 1), key=lambda w: abs(w - root)):
        if classes % width == 0:
            return width
    return root


def check_task(task: Any) -> None:
    """Duck-typed check so kronfluence.Task subclasses (and any object with the methods) pass."""
    for method in ("compute_train_loss", "compute_measurement"):
        if not callable(getattr(task, method, None)):
            raise TypeError(
                f"task must implement {method}(...) (Kronfluence Task protocol, see source_fast.Task); "
                f"got {type(task).__name__} without it"
            )


def tracked_module_names(task: Any) -> list[str] | None:
    getter = getattr(task, "get_influence_tracked_modules", None)
    return getter() if callable(getter) else None


def has_loss_pair(task: Any) -> bool:
    """Whether the task defines compute_train_loss_pair (both training losses from one forward)."""
    return callable(getattr(task, "compute_train_loss_pair", None))


def attention_mask(task: Any, batch: Any) -> torch.Tensor | None:
    getter = getattr(task, "get_attention_mask", None)
    return getter(batch) if callable(getter) else None
