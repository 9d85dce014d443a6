"""Tiny models, tasks and training runs shared by the pipeline tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import source_fast as sf


class ClassificationTask(sf.Task):
    """Summed cross-entropy; sample=True draws labels from the model's predictive distribution."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, self._draw(logits) if sample else y, reduction="sum")

    @staticmethod
    def _draw(logits):
        with torch.no_grad():
            return torch.multinomial(F.softmax(logits.double(), -1), 1).flatten()

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


class PairedClassificationTask(ClassificationTask):
    """ClassificationTask plus compute_train_loss_pair: both training losses from one forward, the
    labels drawn exactly as compute_train_loss(sample=True) draws them."""

    def compute_train_loss_pair(self, batch, model):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, self._draw(logits), reduction="sum"), F.cross_entropy(logits, y, reduction="sum")


class RegressionTask(sf.Task):
    """Gaussian NLL (unit variance): 0.5 (f − y)² summed; sample=True draws y ~ N(f, 1)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        pred = model(x)
        if sample:
            with torch.no_grad():
                y = pred + torch.randn_like(pred)
        return 0.5 * ((pred - y) ** 2).sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return 0.5 * ((model(x) - y) ** 2).sum()


def mlp(d_in=4, hidden=5, d_out=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


class TinyCNN(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1, stride=2, padding_mode=padding_mode)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TinyCNN1d(nn.Module):
    """Two 1-D convolutions ("same" padding with an even kernel, then strided "valid") and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=4, padding="same")
        self.conv2 = nn.Conv1d(3, 2, kernel_size=3, stride=2)
        self.fc = nn.Linear(2 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


class TinyGroupedCNN(nn.Module):
    """A convolution, a grouped one (2 groups) and a depthwise one (reflect padding), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1, stride=2)
        self.grouped = nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=4, padding_mode="reflect")
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.tanh(self.conv(x))))
        return self.fc(torch.tanh(self.depthwise(h)).flatten(1))


class ResidualBatchNormCNN(nn.Module):
    """A ResNet's pattern in miniature: bias-free convs, each followed by BatchNorm, a residual add, global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.fc(h.mean((2, 3)))


class OneChannelConvNet(nn.Module):
    """Layers of one input channel in every form the pipeline gives them: a Conv1d of one channel (2 outputs), a
    depthwise conv with channel multiplier 2, a strided depthwise conv with circular padding; inputs [B, 1, 20]."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv1d(1, 2, 3, padding=1)
        self.multiplier = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.strided = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, padding_mode="circular")
        self.fc = nn.Linear(4 * 2 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x)).reshape(x.shape[0], 2, 4, 5)
        h = torch.tanh(self.strided(torch.tanh(self.multiplier(h))))
        return self.fc(h.flatten(1))


class SharedMLP(nn.Module):
    """A Linear applied `repeats` times (weights shared across the calls, as an unrolled recurrence), between an
    input and an output layer."""

    def __init__(self, d_in=4, hidden=5, d_out=3, repeats=2):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d_out)
        self.repeats = repeats

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(self.repeats):
            h = torch.tanh(self.shared(h))
        return self.head(h)


class SiameseCNN(nn.Module):
    """One convolution and one depthwise convolution each applied to an image and to its mirror image (a siamese
    encoder: shared weights, two calls per forward), then a linear head on both views."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1, stride=2)
        self.depthwise = nn.Conv2d(3, 3, kernel_size=3, padding=1, groups=3)
        self.fc = nn.Linear(2 * 3 * 3 * 3, 3)

    def forward(self, x):
        views = [torch.tanh(self.depthwise(torch.tanh(self.conv(v)))).flatten(1) for v in (x, x.flip(-1))]
        return self.fc(torch.cat(views, 1))


def classification_data(n=24, d_in=4, classes=3, dtype=torch.float64, seed=0, image=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=dtype) if image else torch.randn(n, d_in, generator=gen,
                                                                                      dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


def train_run(model, dataset, *, steps=30, every=5, lr=0.3, momentum=0.0, lr_schedule=None, batch=None,
              weight_decay=0.0):
    """Full-batch (or fixed mini-batch) SGD; returns (checkpoints, steps, per-step lrs)."""
    x, y = dataset.tensors
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    lrs = [lr_schedule(k) if lr_schedule else lr for k in range(steps)]
    ckpts, ckpt_steps = [], []
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        idx = slice(None) if batch is None else slice((k * batch) % len(x), (k * batch) % len(x) + batch)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if (k + 1) % every == 0:
            ckpts.append({key: v.detach().clone() for key, v in model.state_dict().items()})
            ckpt_steps.append(k + 1)
    return ckpts, ckpt_steps, lrs


def adam_mlp_run(moments_seed=0):
    """A 4-5-3 MLP (float64) trained 12 SGD steps on 16 examples, with made-up Adam second moments per checkpoint
    (uniform in [1e-4, 1e-2]): (model, data, ckpts, steps, moments, TrainingRun(optimizer="adam", 2 segments))."""
    import source_fast as sf

    data = classification_data(n=16)
    model = mlp()
    ckpts, steps, _ = train_run(model, data, steps=12, every=3, lr=0.1)
    gen = torch.Generator().manual_seed(moments_seed)
    moments = [{k: torch.rand(v.shape, generator=gen, dtype=v.dtype) * 1e-2 + 1e-4 for k, v in c.items()}
               for c in ckpts]
    run = sf.TrainingRun(ckpts, steps, lr=1e-3, num_segments=2, optimizer="adam", adam_second_moments=moments)
    return model, data, ckpts, steps, moments, run


def small_mlp_run():
    """The 40-example, 6-input MLP trained 30 steps with 6 checkpoints (float64): (model, data, ckpts, steps,
    lrs), shared by the float32 rank test and the CUDA pipeline tests."""
    data = classification_data(n=40, d_in=6)
    model = mlp(d_in=6, hidden=8)
    ckpts, steps, lrs = train_run(model, data, steps=30, every=5, lr=0.3)
    return model, data, ckpts, steps, lrs


def tiny_cnn_run(padding_mode="zeros", grouped=False):
    """TinyCNN (TinyGroupedCNN with `grouped`) (float64) on 16 6x6 images, 12 SGD steps, a checkpoint every 4:
    (model, data, ckpts, steps, lrs), shared by the CPU and CUDA oracle tests."""
    data = classification_data(n=16, image=True)
    torch.manual_seed(1)
    model = (TinyGroupedCNN() if grouped else TinyCNN(padding_mode)).double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.2)
    return model, data, ckpts, steps, lrs


def one_channel_conv_run():
    """OneChannelConvNet (float64) on 14 sequences of 20 values, 12 SGD steps, a checkpoint every 3:
    (model, data, ckpts, steps, lrs)."""
    gen = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(14, 1, 20, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (14,), generator=gen))
    torch.manual_seed(4)
    model = OneChannelConvNet().double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=3, lr=0.2)
    return model, data, ckpts, steps, lrs


def tiny_cnn1d_run():
    """TinyCNN1d (float64) on 16 sequences of 2 channels × 8 positions, 12 SGD steps, a checkpoint every 4."""
    gen = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 2, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,),
                                                                                                   generator=gen))
    torch.manual_seed(3)
    model = TinyCNN1d().double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.2)
    return model, data, ckpts, steps, lrs


# ---- tiny causal LM (transformers imported lazily: tests that use these importorskip it) ----
LM_VOCAB, LM_SEQ = 20, 6


class TokenDataset(torch.utils.data.Dataset):
    """Hugging Face-style items: input_ids, attention_mask and (with_labels) labels = ids where the mask is 1."""

    def __init__(self, ids, mask, with_labels=True):
        self.ids, self.mask, self.with_labels = ids, mask, with_labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.with_labels:
            item["labels"] = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return item


class MappingItems(torch.utils.data.Dataset):
    """Hugging Face-style items from equally long tensors: item i is {name: column[i]} (e.g. input_ids,
    attention_mask and labels; pixel_values and labels)."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {name: column[i] for name, column in self.columns.items()}


def padded_tokens(n=10, lengths=(3, LM_SEQ), seed=0):
    """(ids [n, LM_SEQ], right-padding attention mask): documents of lengths[0]..lengths[1] tokens (inclusive)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LM_VOCAB, (n, LM_SEQ), generator=gen)
    length = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen)
    return ids, (torch.arange(LM_SEQ)[None, :] < length[:, None]).long()


def tiny_gpt2(dtype=torch.float64):
    """A one-block GPT-2 from a config (random init, no download, no dropout)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=LM_VOCAB, n_positions=LM_SEQ, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def padded_gpt2_run(n=10):
    """tiny_gpt2 (float64) on n right-padded documents of 3..6 tokens, its Conv1D layers tracked, 8 SGD steps, 4
    checkpoints, 2 segments: (model, data, mask, task, names, run)."""
    import source_fast as sf

    model = tiny_gpt2()
    ids, mask = padded_tokens(n=n)
    data = TokenDataset(ids, mask)
    names = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = sf.CausalLMTask(names)
    ckpts, steps = lm_checkpoints(model, data, task)
    return model, data, mask, task, names, sf.TrainingRun(ckpts, steps, lr=0.5, num_segments=2)


def lm_checkpoints(model, data, task, steps=8, every=2, lr=0.5):
    """Full-batch SGD on the task's mean per-example (per-document) loss: (checkpoints, steps)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    ckpts, ckpt_steps = [], []
    for k in range(steps):
        opt.zero_grad()
        (task.compute_train_loss(batch, model) / len(data)).backward()
        opt.step()
        if (k + 1) % every == 0:
            ckpts.append({n: v.detach().clone() for n, v in model.state_dict().items()})
            ckpt_steps.append(k + 1)
    return ckpts, ckpt_steps
