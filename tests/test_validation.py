"""Bad input gets a clear error naming the argument, what was expected and what was given.

Each row: (description, callable building the bad call, exception type, message regex). The table
in docs/ERRORS.md lists the same cases with the messages they give (scripts/gen_error_table.py writes it;
`test_errors_doc_is_current` fails when it is stale).
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import source_fast as sf
from source_fast import ops, spectral

from _models import ClassificationTask, TinyCNN, classification_data, mlp


def _ckpts(model, n=3):
    return [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(n)]


MODEL = mlp()
CKPTS = _ckpts(MODEL)
DATA = classification_data(n=10)


def run(**kw):
    args = dict(checkpoints=CKPTS, steps=[2, 4, 6], lr=0.1, num_segments=3)
    args.update(kw)
    return sf.TrainingRun(**args)


def analyzer(model=MODEL, task=None, training_run=None, **kw):
    return sf.SourceAnalyzer(model, task or ClassificationTask(), training_run or run(), progress=False, **kw)


def _triton_blocks_override(entries):
    from source_fast.kernels import _blocks

    try:
        _blocks.override_blocks(entries)
    finally:
        _blocks.override_blocks(None)


def _huge_output_analyzer():
    """A 300,000-way output layer (a large vocabulary): its 300k × 300k eigendecomposition needs ≈ 2 TiB."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 300_000))
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    return analyzer(model=model, training_run=sf.TrainingRun([ckpt], [4], lr=0.1, num_segments=1))


def _per_token_scores_of_a_cnn():
    """A conv layer (9 output positions) and a Linear head (one position): per-token scores have no common T."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    data = classification_data(n=4, image=True)
    training_run = sf.TrainingRun(_ckpts(model, 1), [4], lr=0.1, num_segments=1)
    return analyzer(model=model, training_run=training_run).per_token_scores(data, data)


class NoMeasurement:
    def compute_train_loss(self, batch, model, sample=False):
        return torch.zeros(())


class VectorLossTask(ClassificationTask):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


class SingleLossPairTask(ClassificationTask):
    def compute_train_loss_pair(self, batch, model):
        return self.compute_train_loss(batch, model, sample=True)


class TokensIntoDim0(nn.Module):
    """Flattens [B, T, 4] tokens into dim 0 before its Linears (x.view(-1, d)), then pools them back."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        b, t, _ = x.shape
        return self.out(torch.tanh(self.inner(x.reshape(b * t, 4)))).view(b, t, 3).mean(1)


class TokensFirst(nn.Module):
    """Its second Linear sees [T, B, ·] (tokens first): the layers disagree on dim 0."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x).transpose(0, 1))).mean(0))


class SharedAcrossBatchSizes(nn.Module):
    """One Linear called on the whole batch and on its first example."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lin(x) + self.lin(x[:1]))


class WeightReadDirectly(nn.Module):
    """Uses its Linear's weight through F.linear: the module itself is never called."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.lin.weight, self.lin.bias))


def _one_checkpoint(model):
    return sf.TrainingRun([{k: v.clone() for k, v in model.state_dict().items()}], [1], lr=0.1, num_segments=1)


def _scores_of(model, data):
    return analyzer(model=model, training_run=_one_checkpoint(model), batch_size=5).pairwise_scores(data, data)


TOKEN_DATA = TensorDataset(torch.linspace(-1, 1, 72, dtype=torch.float64).view(6, 3, 4), torch.zeros(6).long())


BAD_INPUTS = [
    # TrainingRun
    ("empty checkpoint list", lambda: run(checkpoints=[], steps=[]), ValueError, "at least one checkpoint"),
    ("checkpoints not a list", lambda: run(checkpoints=CKPTS[0]), TypeError, "checkpoints must be a list"),
    ("checkpoint of wrong type", lambda: run(checkpoints=[1, 2, 3]), TypeError, r"checkpoints\[0\] must be"),
    ("steps length mismatch", lambda: run(steps=[2, 4]), ValueError, "one entry per checkpoint"),
    ("steps out of order", lambda: run(steps=[2, 6, 4]), ValueError, "strictly increasing"),
    ("negative step", lambda: run(steps=[-1, 4, 6]), ValueError, r"steps\[0\] must be an integer >= 0"),
    ("negative learning rate", lambda: run(lr=-0.1), ValueError, "lr at step 0 must be a finite number >= 0"),
    ("non-finite learning rate", lambda: run(lr=[0.1] * 3 + [math.nan] * 3), ValueError, "lr at step 3"),
    ("lr schedule too short", lambda: run(lr=[0.1] * 5), ValueError, "at least one entry per update"),
    ("lr of wrong type", lambda: run(lr="fast"), TypeError, "lr must be a float"),
    ("more segments than checkpoints", lambda: run(num_segments=4), ValueError,
     r"num_segments \(4\) must not exceed the number of checkpoints \(3\)"),
    ("zero segments", lambda: run(num_segments=0), ValueError, "num_segments must be >= 1"),
    ("segment without checkpoint", lambda: run(num_segments=[1]), ValueError, "contains no checkpoint"),
    ("momentum out of range", lambda: run(momentum=1.0), ValueError, r"momentum must be a number in \[0, 1\)"),
    ("stage boundary outside run", lambda: run(stage_boundaries=[6], example_stages=[0] * 10), ValueError,
     r"stage_boundaries\[0\] must be a step in"),
    ("stages without example_stages", lambda: run(stage_boundaries=[3]), ValueError, "example_stages is required"),
    ("example stage out of range", lambda: run(stage_boundaries=[3], example_stages=[0, 2]), ValueError,
     r"example_stages values must be in \[0, 1\]"),
    ("non-positive loss scale", lambda: run(loss_scale=0), ValueError, "loss_scale must be a finite number > 0"),
    ("adam without moments", lambda: run(optimizer="adam"), ValueError, "needs adam_second_moments"),
    ("unknown optimizer", lambda: run(optimizer="lion"), ValueError, "optimizer must be 'sgd', 'adam' or 'adamw'"),
    ("negative weight decay", lambda: run(weight_decay=-0.01), ValueError,
     "weight_decay must be a finite number >= 0, got -0.01"),
    ("weight decay of a parameter not a number", lambda: run(weight_decay={"0.weight": "0.1"}), ValueError,
     r"weight_decay\['0.weight'\] must be a finite number >= 0, got '0.1'"),
    ("learning-rate ratio not positive", lambda: run(lr_scale={"0.weight": -1.0}), ValueError,
     r"lr_scale\['0.weight'\] must be a finite number > 0, got -1.0"),
    # SourceAnalyzer
    ("model not a module", lambda: analyzer(model="net"), TypeError, "model must be a torch.nn.Module"),
    ("score_dtype not a floating dtype", lambda: analyzer(score_dtype=torch.int8), ValueError,
     "score_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got torch.int8"),
    ("task missing a method", lambda: analyzer(task=NoMeasurement()), TypeError,
     r"task must implement compute_measurement"),
    ("run of wrong type", lambda: sf.SourceAnalyzer(MODEL, ClassificationTask(), {"steps": 1}), TypeError,
     "run must be a source_fast.TrainingRun"),
    ("unknown method", lambda: analyzer(method="magic"), ValueError, "method must be one of"),
    ("weight decay of parameters the model lacks",
     lambda: analyzer(training_run=run(weight_decay={"module.0.weight": 0.1})), ValueError,
     r"run.weight_decay names 1 parameters the model does not have, e.g. \['module.0.weight'\]"),
    ("learning-rate ratios of parameters the model lacks",
     lambda: analyzer(training_run=run(lr_scale={"head.weight": 10.0})), ValueError,
     r"run.lr_scale names 1 parameters the model does not have, e.g. \['head.weight'\]"),
    ("unknown fisher", lambda: analyzer(fisher="exact"), ValueError, "fisher must be 'sampled' or 'empirical'"),
    ("query rank not a positive integer", lambda: analyzer(query_rank=0), ValueError,
     "query_rank must be an integer >= 1 or None, got 0"),
    ("bad batch size", lambda: analyzer(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    ("negative damping", lambda: analyzer(damping=-1.0), ValueError, "damping must be a finite float >= 0"),
    ("zero damping for influence", lambda: analyzer(method="influence", damping=0.0), ValueError,
     "damping for method='influence' must be a finite float > 0"),
    ("model without supported modules", lambda: analyzer(model=nn.Sequential(nn.Tanh())), ValueError,
     "has no supported modules"),
    ("unknown tracked module", lambda: analyzer(task=type("T", (ClassificationTask,), {
        "get_influence_tracked_modules": lambda self: ["nope"]})()), ValueError, "tracked module 'nope'"),
    ("mismatched checkpoint keys", lambda: analyzer(training_run=run(
        checkpoints=[{"0.weight": torch.zeros(5, 4)}] + CKPTS[1:])), ValueError,
     r"checkpoints\[0\] does not match the model's state_dict: missing keys"),
    ("a training checkpoint instead of a state_dict", lambda: analyzer(training_run=run(
        checkpoints=[{"model": c, "optimizer": {}, "epoch": 3} for c in CKPTS])), ValueError,
     r"it holds mappings under \['model', 'optimizer'\]: a training checkpoint, not a state_dict \(pass its model's "
     r"state_dict, e.g. torch.load\(path\)\['model'\]\)"),
    ("a wrapped model's checkpoint keys", lambda: analyzer(training_run=run(
        checkpoints=[{f"module.{k}": v for k, v in c.items()} for c in CKPTS])), ValueError,
     r"its keys carry the prefix 'module.' \(a wrapped model's state_dict\): strip it"),
    ("empty dataset", lambda: analyzer().fit(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long())),
     ValueError, "train_dataset is empty"),
    ("dataset without length", lambda: analyzer().fit(iter([1, 2])), TypeError, "map-style"),
    ("example_stages length mismatch", lambda: analyzer(training_run=run(
        stage_boundaries=[3], example_stages=[0, 1], num_segments=2)).fit(DATA), ValueError,
     "example_stages has 2 entries but train_dataset has 10"),
    ("task returning a vector", lambda: analyzer(task=VectorLossTask()).fit(DATA), TypeError,
     "must return a scalar tensor"),
    ("loss pair that is one loss", lambda: analyzer(task=SingleLossPairTask()).pairwise_scores(DATA, DATA), TypeError,
     r"compute_train_loss_pair must return \(sampled_loss, true_loss\)"),
    ("tracked layers that fold tokens into the examples' dim", lambda: _scores_of(TokensIntoDim0().double(),
                                                                                   TOKEN_DATA), ValueError,
     "the tracked layers see 15 examples along dim 0 of their inputs, but batch 0 holds 5"),
    ("a tracked layer that sees tokens first", lambda: _scores_of(TokensFirst().double(), TOKEN_DATA), ValueError,
     r"tracked layers disagree on the number of examples in the batch .*'mix': 3"),
    ("a shared module called with another batch size", lambda: _scores_of(SharedAcrossBatchSizes().double(), DATA),
     ValueError, r"'lin' was called 2 times in one forward with batch sizes \[5, 1\]"),
    ("a tracked module whose weight is read directly", lambda: _scores_of(WeightReadDirectly().double(), DATA),
     RuntimeError, r"tracked modules \['lin'\] were not called in the forward pass \(a module whose weight the "
                   r"model reads directly"),
    ("tracking nn.MultiheadAttention's out_proj", lambda: analyzer(model=nn.ModuleDict({
        "attn": nn.MultiheadAttention(4, 2), "head": nn.Linear(4, 3)}), task=type("T", (ClassificationTask,), {
            "get_influence_tracked_modules": lambda self: ["attn.out_proj"]})()), ValueError,
     "'attn.out_proj': nn.MultiheadAttention uses its out_proj's weight directly"),
    ("per-token scores of layers that see other positions", _per_token_scores_of_a_cnn, ValueError,
     r"per_token_scores needs every tracked layer to see the same token positions, but the layers see "
     r"\{'conv': 9, 'fc': 1\} rows per example"),
    ("a tracked layer whose EK-FAC cannot fit in memory", lambda: _huge_output_analyzer(), ValueError,
     r"tracked module '1' \(\[300000, 5\]\) needs a 300000 × 300000 float64 eigendecomposition"),
    ("nll_pair labels of the wrong shape", lambda: sf.nll_pair(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long)),
     ValueError, r"labels must be an integer tensor of shape logits.shape\[:-1\] = \(3,\)"),
    ("nll_pair label out of range", lambda: sf.nll_pair(torch.zeros(3, 4), torch.tensor([0, 4, 1])), ValueError,
     r"labels must lie in \[0, 4\) or equal ignore_index=-100"),
    ("linear_nll_pair weight of the wrong width", lambda: sf.linear_nll_pair(torch.zeros(3, 4), torch.zeros(5, 3),
                                                                            torch.zeros(3, dtype=torch.long)),
     ValueError, r"weight must be \[classes, 4\]"),
    # ops
    ("op input not a tensor", lambda: ops.covariance([[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("op input wrong ndim", lambda: ops.covariance(torch.zeros(3)), ValueError, "x must have 2 dimensions"),
    ("op integer dtype", lambda: ops.covariance(torch.zeros(3, 3, dtype=torch.long)), TypeError,
     "x must have dtype in"),
    ("op shape mismatch", lambda: ops.score_pairwise(torch.zeros(2, 3, 4), torch.zeros(5, 1, 4),
                                                     torch.zeros(5, 1, 2)), ValueError,
     r"v must have size 2 in dimension 1"),
    ("op dtype mismatch", lambda: ops.lambda_accum(torch.zeros(2, 1, 3), torch.zeros(2, 1, 2, dtype=torch.float64),
                                                   torch.eye(3), torch.eye(2)), TypeError,
     "a and g must share a dtype"),
    ("op tensors on different devices", lambda: ops.score_pairwise(torch.zeros(2, 3, 4, device="meta"),
                                                                   torch.zeros(5, 1, 4), torch.zeros(5, 1, 3)),
     ValueError, "all tensors must be on one device, got v on meta"),
    ("op unknown backend", lambda: ops.covariance(torch.zeros(3, 3), backend="fpga"), ValueError,
     "backend must be one of"),
    ("spectral zero damping inverse", lambda: spectral.inverse(0), ValueError, "needs damping > 0"),
    ("Triton tile override of the wrong shape", lambda: _triton_blocks_override({"GEMM_GPU_BLOCKS": {"2": [64, 64]}}),
     ValueError, r"GEMM_GPU_BLOCKS\[2\]: expected ints >= 1 shaped like \(128, 128, 64, 8\), got \(64, 64\)"),
]


@pytest.mark.parametrize("build, exc, pattern", [pytest.param(b, e, p, id=d) for d, b, e, p in BAD_INPUTS])
def test_bad_input_raises_clear_error(build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build()


def test_non_finite_factors_raise_naming_layer_and_checkpoint():
    model = mlp()
    ckpts = _ckpts(model)
    ckpts[1] = {k: v.clone() for k, v in ckpts[1].items()}
    ckpts[1]["0.weight"][0, 0] = float("nan")
    bad = sf.TrainingRun(ckpts, [2, 4, 6], lr=0.1, num_segments=3)
    a = sf.SourceAnalyzer(model, ClassificationTask(), bad, fisher="empirical", progress=False)
    with pytest.raises(FloatingPointError, match=r"layer '.*' at ckpt1 \(segment 1\) contains NaN/Inf"):
        a.fit(DATA)


def test_non_finite_data_propagates_when_checks_are_off():
    x, y = DATA.tensors
    x = x.clone()
    x[0, 0] = float("inf")
    a = sf.SourceAnalyzer(mlp(), ClassificationTask(), run(), fisher="empirical", progress=False,
                          check_finite=False)
    scores = a.pairwise_scores(TensorDataset(x[1:3], y[1:3]), TensorDataset(x, y))  # the user asked to propagate
    assert not torch.isfinite(scores).all()
    with pytest.raises(FloatingPointError, match="contains NaN/Inf"):
        sf.SourceAnalyzer(mlp(), ClassificationTask(), run(), fisher="empirical", progress=False).fit(
            TensorDataset(x, y))


def test_checkpoint_file_missing_is_reported(tmp_path):
    missing = tmp_path / "nope.pt"
    r = run(checkpoints=[str(missing)] + CKPTS[1:])
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[0\]: file .*nope.pt"):
        analyzer(training_run=r).fit(DATA)


def test_factor_memory_check_uses_the_devices_free_memory_and_logs_large_eigendecompositions(monkeypatch, caplog):
    """The pre-flight bound: a layer that fits passes, the same layer against less free memory raises naming
    it, an eigendecomposition above _LARGE_EIGH is logged, and methods without EK-FAC are not checked."""
    from source_fast import analyzer as analyzer_module

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 200))
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    one = sf.TrainingRun([ckpt], [4], lr=0.1, num_segments=1)
    analyzer(model=model, training_run=one)  # 200² doubles: fits anywhere
    need = 3 * 200 * 200 * 8  # the eigendecomposition alone
    monkeypatch.setattr(analyzer_module, "_available_bytes", lambda device: need // 2)
    with pytest.raises(ValueError, match=r"tracked module '1' \(\[200, 5\]\) .* are available on cpu"):
        analyzer(model=model, training_run=one)
    analyzer(model=model, training_run=one, method="tracin")  # no EK-FAC: no factor memory
    monkeypatch.setattr(analyzer_module, "_available_bytes", lambda device: None)  # unknown: not checked
    monkeypatch.setattr(analyzer_module, "_LARGE_EIGH", 100)
    with caplog.at_level("WARNING", logger="source_fast"):
        analyzer(model=model, training_run=one)
    assert "'1' needs a 200 × 200 eigendecomposition" in caplog.text


def test_errors_doc_is_current():
    """docs/ERRORS.md is what scripts/gen_error_table.py writes from BAD_INPUTS now: a new case, or a changed
    message, without regenerating the table fails here."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_error_table", root / "scripts" / "gen_error_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (root / "docs" / "ERRORS.md").read_text() == gen.render(), \
        "docs/ERRORS.md is stale: run `.venv/bin/python scripts/gen_error_table.py`"
