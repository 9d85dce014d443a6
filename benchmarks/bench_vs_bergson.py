"""source_fast vs Bergson 2.5.1 (EleutherAI) SOURCE on CPU: wall time, peak RSS, disk writes, agreement.

The workload of the issue: "a tiny GPT-2 from a transformers config, 1,000 docs of ~35 tokens, 50 queries,
L=3 segments, C=6 checkpoints: Bergson 2.5.1 took 273 s and wrote 1.1 GB. Targets: source_fast ≥ 10× faster
than Bergson with ≤ 1/10 of its disk writes."

One shared workload, built once in the parent process (seeded, no downloads):

  model   transformers.GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000,
          n_positions=64), dropout 0), random init
  data    1,000 training + 50 query documents of 30-40 tokens (mean ~35) drawn from a seeded sparse random
          bigram chain over the vocabulary
  train   SGD, heavy-ball momentum 0.9, lr 0.01 (constant), batch 50, 3 epochs = 60 steps; loss = per-document
          next-token NLL summed over tokens, averaged over the batch (the per-example loss both libraries use
          by default); checkpoints after steps 10, 20, …, 60 (C = 6)
  SOURCE  L = 3 segments (2 checkpoints each), c_ℓ = Σ η_k / (1 − β) = 20 · 0.01 / 0.1 = 2.0 per segment,
          EK-FAC per segment with true-Fisher (sampled-label) curvature, no extra damping, the 8 Conv1D layers
          of the transformer blocks (weights), scores for 50 queries × 1,000 training docs.

Both libraries get the same checkpoints (Bergson reads them as Hugging Face model directories written by
`save_pretrained` with a word-level tokenizer beside them; source_fast gets the same state dicts), the same
token ids, learning rates, momentum and segmentation. Each library runs in a fresh subprocess with the same
torch thread count (--threads, default 2), Bergson in its own virtual environment (.venv-bergson, made by
scripts/setup_bergson_env.sh) through its public entry point, the `bergson approxunrolling` command object
(`bergson.cli.commands.ApproxUnrolling(index_cfg, hessian_cfg, approx_unrolling_cfg).execute()`).

Measured per library (--repeats runs each, default 1, libraries alternating; the summary uses the median-time
run): wall time of the whole SOURCE run (fit + scores) and per stage, peak RSS
(VmHWM of the worker), bytes written to disk (/proc/self/io write_bytes of the worker over the timed run;
the kernel adds reaped children's counters to their parent's, so children are included; plus the total
size of the library's output directory at the end) and the CPU time. Imports, data loading and (for
Bergson) writing its input datasets with `Dataset.save_to_disk` happen before the timer and are not
counted. Agreement: Spearman correlation of the two libraries' scores per query (mean, min), after
converting Bergson's scores to source_fast's convention (see `_bergson_to_source_fast`).

Differences, and how they were handled (also written into the markdown):
  * layers: Bergson hooks `model.base_model` (GPT2Model), never lm_head; source_fast's Task names the same 8
    Conv1D layers;
  * biases: Bergson's SOURCE path attributes weights only (include_bias=True fails in its per-checkpoint
    eigenvalue-correction pass with "AssertionError: Vector shape … not compatible with matrix shape …": the
    Λ collector is built without the bias column); source_fast always folds a layer's bias in, so its worker
    gets each Conv1D as an equivalent bias-free nn.Linear + an untracked shift (`_weight_only`; --sf-bias
    keeps the biases, and the scores then differ);
  * label sampling for the true Fisher uses each library's own RNG stream (same distribution, other draws);
  * Bergson's token batch may not exceed the model's context (n_positions = 64 here), so it runs one ~35-token
    document per batch; source_fast uses --batch-size documents per batch (default 64, its default);
  * source_fast runs `pairwise_scores` without `fit()` first (--sf-two-pass calls fit() first): one pass per
    checkpoint, the scored training gradients taken from the curvature passes' forwards (its LMTask defines
    `compute_train_loss_pair` with `sf.linear_nll_pair`), so it reports one stage, "fit + scores in one pass";
  * what is stored is each library's design: Bergson keeps per-checkpoint covariances, walked query gradients
    per segment and per-checkpoint scores; source_fast per-checkpoint covariances and Λ, per-segment factors and
    the score matrix.

    python benchmarks/bench_vs_bergson.py                  # full run (several minutes on 2 cores)
    python benchmarks/bench_vs_bergson.py --repeats 3      # what results/vs_bergson_cpu.* were made with
    python benchmarks/bench_vs_bergson.py --smoke          # seconds; source_fast only unless Bergson's venv
                                                           # imports; writes nothing
    python benchmarks/bench_vs_bergson.py --libraries source_fast --threads 2

Results: benchmarks/results/vs_bergson_cpu.csv and .md (full run only).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BERGSON_PYTHON = REPO / ".venv-bergson" / "bin" / "python"
ONE_PASS = "fit + scores in one pass"  # source_fast's stage when pairwise_scores runs without fit() first

FULL = {"n_train": 1000, "n_query": 50, "doc_len": (30, 40), "vocab": 1000, "n_positions": 64, "n_embd": 64,
        "n_layer": 2, "n_head": 2, "train_batch": 50, "epochs": 3, "lr": 0.01}
SMOKE = {"n_train": 60, "n_query": 4, "doc_len": (6, 10), "vocab": 40, "n_positions": 16, "n_embd": 16,
         "n_layer": 1, "n_head": 2, "train_batch": 10, "epochs": 2, "lr": 0.01}
NUM_CHECKPOINTS, NUM_SEGMENTS, MOMENTUM = 6, 3, 0.9
QUOTED = {"seconds": 273.0, "disk_bytes": 1.1e9}  # the Bergson numbers (not measured here)

COLUMNS = ["library", "run", "stage", "seconds", "cpu_seconds", "peak_rss_mib", "rss_before_mib", "write_bytes",
           "cancelled_write_bytes", "output_dir_bytes", "output_files", "process_seconds", "loadavg_1m", "load_mean",
           "load_max",
           "threads", "batch", "n_train", "n_query", "cpu_model", "torch_version", "transformers_version",
           "library_version", "source_fast_commit", "date", "status"]


# ------------------------------------------------------------------------------ shared definitions


def gpt2_config(sizes: dict):
    import transformers

    return transformers.GPT2Config(vocab_size=sizes["vocab"], n_positions=sizes["n_positions"],
                                   n_embd=sizes["n_embd"], n_layer=sizes["n_layer"], n_head=sizes["n_head"],
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                   eos_token_id=0, pad_token_id=0)


def make_documents(sizes: dict):
    """Token ids [n, max_len] (right-padded with 0) and lengths [n], from a sparse random bigram chain."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    vocab = sizes["vocab"]
    n = sizes["n_train"] + sizes["n_query"]
    lo, hi = sizes["doc_len"]
    # Each token has 8 likely successors (Dirichlet-ish weights): documents have learnable structure.
    succ = torch.randint(0, vocab, (vocab, 8), generator=gen)
    weights = torch.rand(vocab, 8, generator=gen) ** 2 + 0.05
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    ids = torch.zeros(n, hi, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, hi):
        prev = ids[:, t - 1]
        pick = torch.multinomial(weights[prev], 1, generator=gen).squeeze(1)
        nxt = succ[prev, pick]
        noise = torch.rand(n, generator=gen) < 0.1  # 10 % uniform noise
        nxt = torch.where(noise, torch.randint(0, vocab, (n,), generator=gen), nxt)
        ids[:, t] = nxt
    ids = ids.masked_fill(torch.arange(hi)[None, :] >= lengths[:, None], 0)
    return ids, lengths


def doc_loss(model, ids, lengths):
    """Per-document next-token NLL summed over the document's tokens, [batch]."""
    import torch
    import torch.nn.functional as F

    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return tok.sum(1)


def tracked_modules(sizes: dict) -> list[str]:
    """The layers both libraries attribute through: the Conv1D layers of the transformer blocks. Bergson
    hooks `model.base_model` (GPT2Model), so lm_head is not among its layers; source_fast is told the same."""
    return [f"transformer.h.{i}.{m}" for i in range(sizes["n_layer"])
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _word_tokenizer(vocab: int, max_len: int):
    """A word-level tokenizer over "t0".."t{vocab-1}" (Bergson loads one from each checkpoint directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t0",
                                   eos_token="t0", model_max_length=max_len)


def prepare_workload(sizes: dict, work: Path, hf_checkpoints: bool) -> dict:
    """Train the tiny GPT-2 (SGD + momentum), save C checkpoints (state dicts in workload.pt; Hugging Face
    directories checkpoint-<step>/ for Bergson when hf_checkpoints) and the token ids."""
    import torch
    import transformers

    ids, lengths = make_documents(sizes)
    n_train = sizes["n_train"]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(sizes))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=sizes["lr"], momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(7)
    bs = sizes["train_batch"]
    per_epoch = -(-n_train // bs)
    total = sizes["epochs"] * per_epoch
    every = total // NUM_CHECKPOINTS
    ckpt_steps = [every * (k + 1) for k in range(NUM_CHECKPOINTS - 1)] + [total]
    checkpoints, step, losses = [], 0, []
    for _ in range(sizes["epochs"]):
        perm = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train, bs):
            idx = perm[start:start + bs]
            loss = doc_loss(model, ids[idx], lengths[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item() / lengths[idx].float().sub(1).mean().item())  # per token, for the log
            if step in ckpt_steps:
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    hf_dirs = []
    if hf_checkpoints:
        tokenizer = _word_tokenizer(sizes["vocab"], sizes["n_positions"])
        for s, state in zip(ckpt_steps, checkpoints):
            model.load_state_dict(state)
            d = work / "hf" / f"checkpoint-{s}"
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            hf_dirs.append(str(d))
    blob = {"ids": ids, "lengths": lengths, "n_train": n_train, "sizes": sizes, "checkpoints": checkpoints,
            "steps": ckpt_steps, "lr": sizes["lr"], "momentum": MOMENTUM, "hf_dirs": hf_dirs}
    torch.save(blob, work / "workload.pt")
    return {"steps": ckpt_steps, "loss_first": sum(losses[:5]) / 5, "loss_last": sum(losses[-5:]) / 5,
            "total_steps": total}


# ------------------------------------------------------------------------------------ worker side


def _io() -> dict:
    """/proc/self/io counters (write_bytes: bytes this process, and its reaped children, caused to be
    written to storage, counted when pages are dirtied, memory-mapped writes included)."""
    out = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, value = line.split(":")
            out[key.strip()] = int(value)
    except OSError:
        pass
    return out




def _dir_size(path: Path) -> tuple[int, int]:
    total = files = 0
    if path.exists():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
                files += 1
    return total, files


class _Meter:
    """Wall, CPU, write_bytes per stage and for the whole run."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.cpu0 = _process.cpu_seconds(children=True)
        self.io0 = _io()

    def stage(self, name, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t

    def result(self, out_dir: Path) -> dict:
        seconds = time.perf_counter() - self.t0
        io1 = _io()
        size, files = _dir_size(out_dir)
        return {"seconds": seconds, "cpu_seconds": _process.cpu_seconds(children=True) - self.cpu0, "peak_rss_mib": _process.rss_mib(),
                "write_bytes": io1.get("write_bytes", 0) - self.io0.get("write_bytes", 0),
                "cancelled_write_bytes": io1.get("cancelled_write_bytes", 0)
                - self.io0.get("cancelled_write_bytes", 0),
                "output_dir_bytes": size, "output_files": files, "stages": dict(self.stages),
                "loadavg_1m": os.getloadavg()[0]}


def _weight_only(model, names, checkpoints):
    """Attribute through the weights only, as Bergson does (its SOURCE pipeline has no working bias option:
    with include_bias=True its eigenvalue-correction pass fails, see the module docstring). Each tracked
    Conv1D, x ↦ x W + b, becomes an equivalent `lin` = nn.Linear(bias=False) with weight Wᵀ followed by an
    untracked `shift` = b; the checkpoints are re-keyed to match. Same function, same parameters."""
    import torch
    from torch import nn

    class WeightOnly(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.lin = nn.Linear(conv.nx, conv.nf, bias=False)
            self.shift = nn.Parameter(torch.zeros(conv.nf))

        def forward(self, x):
            return self.lin(x) + self.shift

    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, WeightOnly(model.get_submodule(name)))
    converted = []
    for state in checkpoints:
        state = dict(state)
        for name in names:
            state[f"{name}.lin.weight"] = state.pop(f"{name}.weight").t().contiguous()
            state[f"{name}.shift"] = state.pop(f"{name}.bias")
        converted.append(state)
    return model, converted


def _source_fast_worker(spec: dict, blob) -> dict:
    import numpy as np
    import torch
    import transformers
    from torch.utils.data import Dataset

    import source_fast as sf

    class Docs(Dataset):
        def __init__(self, ids, lengths):
            self.ids, self.lengths = ids, lengths

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return self.ids[i], self.lengths[i]

    class LMTask(sf.Task):
        """Per-document next-token NLL summed over tokens (the loss both libraries step on per example);
        the activation covariance uses the positions that predict a token (Bergson's collection mask)."""

        def compute_train_loss(self, batch, model, sample=False):
            ids, lengths = batch
            if not sample:
                return doc_loss(model, ids, lengths).sum()
            return self.compute_train_loss_pair(batch, model)[0]

        def compute_train_loss_pair(self, batch, model):
            """(sampled-label loss, true-label loss) from one forward: source_fast's SOURCE then takes the
            scored training gradients from the curvature passes' forwards. sf.linear_nll_pair on the last
            hidden states and lm_head's weight (lm_head is not tracked): one softmax for both losses and the
            label draws (sf.sample_labels' inverse CDF), one lm_head product backward for both."""
            ids, lengths = batch
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            labels = torch.full_like(ids, -100)  # position t predicts token t + 1 of the document
            labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            hidden = model.transformer(input_ids=ids, attention_mask=mask)[0]
            return sf.linear_nll_pair(hidden, model.lm_head.weight, labels)

        def compute_measurement(self, batch, model):
            ids, lengths = batch
            return doc_loss(model, ids, lengths).sum()

        def get_attention_mask(self, batch):
            ids, lengths = batch
            return (torch.arange(ids.shape[1])[None, :] < (lengths[:, None] - 1)).long()

        def get_influence_tracked_modules(self):
            return [f"{name}.lin" for name in names] if weight_only else names

    n = blob["n_train"]
    train, query = Docs(blob["ids"][:n], blob["lengths"][:n]), Docs(blob["ids"][n:], blob["lengths"][n:])
    model = transformers.GPT2LMHeadModel(gpt2_config(blob["sizes"]))
    names, weight_only = tracked_modules(blob["sizes"]), not spec.get("sf_bias", False)
    checkpoints = blob["checkpoints"]
    if weight_only:
        model, checkpoints = _weight_only(model, names, checkpoints)
    model.load_state_dict(checkpoints[-1])
    model.eval()
    out_dir = Path(spec["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    before = _process.rss_mib()
    meter = _Meter()
    run = sf.TrainingRun(checkpoints, blob["steps"], lr=blob["lr"], momentum=blob["momentum"],
                         num_segments=NUM_SEGMENTS)
    analyzer = sf.SourceAnalyzer(model, LMTask(), run, output_dir=out_dir, batch_size=spec["batch_size"],
                                 progress=False, backend=spec.get("sf_backend"))
    if spec.get("sf_two_pass"):  # fit() first: separate passes for the curvature and the scored gradients
        meter.stage("fit", analyzer.fit, train)
        scores = meter.stage("scores", analyzer.pairwise_scores, query, train)
    else:  # pairwise_scores alone: one pass per checkpoint (LMTask.compute_train_loss_pair)
        scores = meter.stage(ONE_PASS, analyzer.pairwise_scores, query, train)
    result = meter.result(out_dir)
    result["rss_before_mib"] = before
    result["library_version"] = getattr(sf, "__version__", "?")
    np.save(spec["scores_path"], scores.double().numpy())  # after the measurement: not counted
    return result


def _bergson_worker(spec: dict, blob) -> dict:
    """Bergson's SOURCE through its public command object (what `bergson approxunrolling …` runs)."""
    import numpy as np
    import torch

    work = Path(spec["work"])
    data_dir = work / "bergson_data"
    # Input datasets (pre-tokenised, with a length column so Bergson maps nothing): before the timer.
    from datasets import Dataset

    n = blob["n_train"]
    ids, lengths = blob["ids"], blob["lengths"]

    def ds(lo, hi):
        rows = [ids[i, :lengths[i]].tolist() for i in range(lo, hi)]
        return Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})

    shutil.rmtree(data_dir, ignore_errors=True)
    ds(0, n).save_to_disk(str(data_dir / "train"))
    ds(n, len(ids)).save_to_disk(str(data_dir / "query"))

    import bergson
    import bergson.approx_unrolling.pipeline as pipe
    from bergson.cli.commands import ApproxUnrolling
    from bergson.config.config import (ApproxUnrollingConfig, DataConfig, HessianConfig, IndexConfig,
                                       QuerySetConfig)
    from bergson.data import load_scores_loss_signed

    out_dir = Path(spec["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = blob["steps"]
    per_seg = len(steps) // NUM_SEGMENTS
    seg_steps = [steps[(l + 1) * per_seg - 1] - (steps[l * per_seg - 1] if l else 0) for l in range(NUM_SEGMENTS)]
    index_cfg = IndexConfig(run_path=str(out_dir), model=blob["hf_dirs"][-1], precision="fp32",
                            data=DataConfig(dataset=str(data_dir / "train")),
                            token_batch_size=spec["bergson_token_batch"], include_bias=False, loss_fn="ce",
                            loss_reduction="sum", projection_dim=0, overwrite=True)
    hessian_cfg = HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp32", use_dataset_labels=False)
    au_cfg = ApproxUnrollingConfig(checkpoints=list(blob["hf_dirs"]), segments=NUM_SEGMENTS,
                                   lr_list=[float(blob["lr"])] * NUM_SEGMENTS, step_size_list=seg_steps,
                                   momentum=float(blob["momentum"]),
                                   query=QuerySetConfig(dataset=str(data_dir / "query"), aggregation="none"))
    command = ApproxUnrolling(index_cfg, hessian_cfg, au_cfg)
    torch.manual_seed(0)
    before = _process.rss_mib()
    meter = _Meter()
    # Stage timers around the pipeline's own steps (the names it calls, patched in its module).
    groups = {"precompute_checkpoint_hessians": "fit", "aggregate_segment_covariances": "fit",
              "precompute_checkpoint_averaged_lambdas": "fit", "aggregate_segment_lambdas": "fit",
              "build_query": "scores", "walk_query_phase1": "scores", "walk_query_phase2": "scores",
              "score_per_segment_and_aggregate": "scores"}
    for name, group in groups.items():
        original = getattr(pipe, name)

        def timed(*a, _f=original, _g=group, _n=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                dt = time.perf_counter() - t
                meter.stages[_g] = meter.stages.get(_g, 0.0) + dt
                meter.stages["bergson:" + _n] = meter.stages.get("bergson:" + _n, 0.0) + dt

        setattr(pipe, name, timed)
    command.execute()
    result = meter.result(out_dir)
    result["rss_before_mib"] = before
    try:
        from importlib.metadata import version

        result["library_version"] = version("bergson")
    except Exception:
        result["library_version"] = getattr(bergson, "__version__", "?")
    scores, _ = load_scores_loss_signed(str(out_dir / "scores"))
    np.save(spec["scores_path"], scores.double().numpy())  # [n_train, n_query], Bergson's sign; not counted
    return result


def worker(spec: dict) -> dict:
    _process.set_threads(spec["threads"])
    import torch

    torch.set_num_threads(spec["threads"])
    blob = torch.load(spec["data"], weights_only=False)
    fn = _source_fast_worker if spec["library"] == "source_fast" else _bergson_worker
    return fn(spec, blob)


# ------------------------------------------------------------------------------------ parent side
def _bergson_to_source_fast(raw, n_train: int):
    """Bergson's final scores → source_fast's convention.

    Bergson stores S[m, q] = −Σ_ℓ mean_{c∈ℓ} ⟨v_ℓ(q), ∇L(z_m, θ_c)⟩ (its per-checkpoint scores are written
    "higher is better" and negated when summed: negative = the example lowers the query's loss), with no 1/N.
    source_fast's τ(q, m) = +(1/N) Σ_ℓ ⟨v_ℓ(q), ḡ_ℓ(z_m)⟩ (removal effect: positive = removing z_m raises the
    query loss). Hence τ = −Sᵀ / N."""
    return -raw.T / n_train


def _spearman_rows(a, b):
    import numpy as np

    def ranks(x):
        r = np.empty_like(x)
        order = np.argsort(x, axis=1, kind="stable")
        rows = np.arange(x.shape[0])[:, None]
        r[rows, order] = np.arange(x.shape[1])[None, :]
        return r

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def compare_scores(sf_path: Path, bg_path: Path, n_train: int) -> dict:
    import numpy as np

    sf_scores = np.load(sf_path)
    bg = _bergson_to_source_fast(np.load(bg_path), n_train)
    rho = _spearman_rows(sf_scores, bg)
    rho_raw = _spearman_rows(sf_scores, -bg)  # what an unconverted comparison would give
    flat = np.corrcoef(sf_scores.ravel(), bg.ravel())[0, 1]
    ratio = np.median(np.abs(bg)) / np.median(np.abs(sf_scores))
    top = []
    for q in range(sf_scores.shape[0]):
        a = set(np.argsort(-sf_scores[q])[:10]) | set(np.argsort(sf_scores[q])[:10])
        b = set(np.argsort(-bg[q])[:10]) | set(np.argsort(bg[q])[:10])
        top.append(len(a & b) / 20)
    return {"spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
            "spearman_median": float(np.median(rho)), "spearman_unconverted_mean": float(rho_raw.mean()),
            "pearson_all": float(flat), "median_abs_ratio": float(ratio), "top20_overlap_mean": float(np.mean(top)),
            "shape": list(sf_scores.shape)}


def _versions(bergson_python: Path | None) -> dict:
    import torch
    import transformers

    import _harness as H

    cpu = H.cpu_description()
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "cpu_model": cpu, "source_fast_commit": _process.git_commit()}




def _bergson_status(python: Path) -> tuple[bool, str]:
    """(usable, reason) for Bergson's interpreter: it must import the SOURCE pipeline."""
    if not python.exists():
        return False, f"{python} not found (run scripts/setup_bergson_env.sh)"
    probe = subprocess.run([str(python), "-c", "import torch, bergson.approx_unrolling.pipeline, "
                            "bergson.cli.commands; import importlib.metadata as m; "
                            "print(m.version('bergson'), torch.__version__)"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300)
    if probe.returncode != 0:
        return False, "import failed: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return True, probe.stdout.strip()


def _run_worker(python: str, spec: dict, timeout: float) -> dict:
    # Anything a library caches (Hugging Face datasets/hub) stays in the scratch folder, and nothing is fetched.
    env = _process.worker_env(spec["threads"], HF_HOME=str(Path(spec["work"]) / "hf_home"), HF_HUB_OFFLINE="1",
                              HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    # The worker's cwd is the scratch folder: the repo root holds a `kernels/` package that would shadow
    # the Hugging Face `kernels` distribution transformers probes for.
    import threading

    samples, stop = [], threading.Event()

    def sample_load():  # the 1-minute load average every 5 s while the worker runs
        while not stop.is_set():
            samples.append(os.getloadavg()[0])
            stop.wait(5.0)

    sampler = threading.Thread(target=sample_load, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    try:
        result = _process.run_worker(__file__, spec, python=python, env=env, timeout=timeout, cwd=spec["work"],
                                     what=f"{spec['library']} worker")
    finally:
        stop.set()
        sampler.join()
    result["process_seconds"] = time.perf_counter() - t0
    result["load_mean"] = sum(samples) / len(samples) if samples else float("nan")
    result["load_max"] = max(samples) if samples else float("nan")
    return result


def _fmt_bytes(b) -> str:
    if not isinstance(b, (int, float)) or b == "":
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _rows(lib: str, res: dict, base: dict) -> list[dict]:
    rows = []
    total = {**base, "library": lib, "stage": "total (fit + scores)", "status": "ok"}
    for key in ("seconds", "cpu_seconds", "peak_rss_mib", "rss_before_mib", "write_bytes", "cancelled_write_bytes",
                "output_dir_bytes", "output_files", "process_seconds", "loadavg_1m", "load_mean", "load_max",
                "library_version"):
        total[key] = res.get(key, "")
    rows.append(total)
    for stage in ("fit", "scores", ONE_PASS):
        if stage in res.get("stages", {}):
            rows.append({**base, "library": lib, "stage": stage, "seconds": res["stages"][stage], "status": "ok",
                         "library_version": res.get("library_version", "")})
    for stage, sec in res.get("stages", {}).items():  # in the pipeline's order
        if stage.startswith("bergson:"):
            rows.append({**base, "library": lib, "stage": stage.split(":", 1)[1], "seconds": sec, "status": "ok",
                         "library_version": res.get("library_version", "")})
    return rows


def _summary(results: dict, agreement: dict | None) -> list[str]:
    sf, bg = results.get("source_fast"), results.get("bergson")
    out = []
    if sf and bg:
        speed = bg["seconds"] / sf["seconds"]
        disk = sf["write_bytes"] / bg["write_bytes"] if bg["write_bytes"] else float("nan")
        runs = ""
        if len(bg.get("all_seconds", [])) > 1:
            runs = (f" (all runs: Bergson {', '.join(f'{x:.1f}' for x in bg['all_seconds'])} s; source_fast "
                    f"{', '.join(f'{x:.1f}' for x in sf['all_seconds'])} s)")
        out.append(f"time: Bergson {bg['seconds']:.1f} s vs source_fast {sf['seconds']:.1f} s = {speed:.1f}× "
                   f"({'MEETS' if speed >= 10 else 'MISSES'} target ≥ 10×){runs}")
        out.append(f"CPU time (less sensitive to other jobs on the machine): Bergson {bg['cpu_seconds']:.1f} s vs "
                   f"source_fast {sf['cpu_seconds']:.1f} s = {bg['cpu_seconds'] / sf['cpu_seconds']:.1f}×")
        out.append(f"disk writes (write_bytes): Bergson {_fmt_bytes(bg['write_bytes'])} vs source_fast "
                   f"{_fmt_bytes(sf['write_bytes'])} = {disk:.3f} of Bergson's "
                   f"({'MEETS' if disk <= 0.1 else 'MISSES'} target ≤ 1/10); output directories "
                   f"{_fmt_bytes(bg['output_dir_bytes'])} vs {_fmt_bytes(sf['output_dir_bytes'])}")
        out.append(f"peak RSS: Bergson {bg['peak_rss_mib']:.0f} MiB vs source_fast {sf['peak_rss_mib']:.0f} MiB")
        out.append(f"for reference, the issue QUOTED Bergson at {QUOTED['seconds']:.0f} s and "
                   f"{_fmt_bytes(QUOTED['disk_bytes'])} written on its machine (not measured here): source_fast's "
                   f"run above is {QUOTED['seconds'] / sf['seconds']:.1f}× faster and writes "
                   f"{sf['write_bytes'] / QUOTED['disk_bytes']:.3f} of that")
    elif sf:
        out.append(f"time: source_fast {sf['seconds']:.1f} s vs QUOTED (issue, not measured here) Bergson "
                   f"{QUOTED['seconds']:.0f} s = {QUOTED['seconds'] / sf['seconds']:.1f}×")
        out.append(f"disk writes: source_fast {_fmt_bytes(sf['write_bytes'])} vs QUOTED Bergson "
                   f"{_fmt_bytes(QUOTED['disk_bytes'])} = {sf['write_bytes'] / QUOTED['disk_bytes']:.4f}")
    if agreement:
        out.append(f"agreement (Spearman per query over {agreement['shape'][1]} training docs, Bergson converted to "
                   f"source_fast's sign and 1/N): mean {agreement['spearman_mean']:.3f}, median "
                   f"{agreement['spearman_median']:.3f}, min {agreement['spearman_min']:.3f}; Pearson over all "
                   f"scores {agreement['pearson_all']:.3f}; median |τ| ratio Bergson/source_fast "
                   f"{agreement['median_abs_ratio']:.3f}; top-10 proponent+opponent overlap "
                   f"{agreement['top20_overlap_mean']:.2f}")
    return out


def _write(rows, results, agreement, summary, meta, args, workload_info, bergson_note, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "vs_bergson_cpu.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r.get(k):.3f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in COLUMNS})
        if agreement:
            for key in ("spearman_mean", "spearman_median", "spearman_min", "pearson_all", "median_abs_ratio",
                        "top20_overlap_mean"):
                writer.writerow({"library": "agreement", "stage": key, "seconds": f"{agreement[key]:.4f}",
                                 "date": meta["date"], "status": "ok"})
    s = args.sizes
    bias_note = ("weights and biases (--sf-bias: source_fast only; Bergson attributes weights only, so the scores "
                 "differ)" if args.sf_bias else "weights only (biases are not attributed: see the notes)")
    md = ["# source_fast vs Bergson SOURCE on CPU (tiny GPT-2)", "",
          f"{meta['cpu_model']} (2 cores shared with other jobs), {args.threads} torch threads per library, torch "
          f"{meta['torch_version']} (CPU) in both environments, transformers {meta['transformers_version']}, "
          f"source_fast {meta['source_fast_commit']}, Bergson {bergson_note}, {meta['date']}. "
          f"{args.repeats} run(s) per library, libraries alternating, each run a fresh process"
          + ("; the summary below uses each library's median-time run (the lower middle for an even count)"
             if args.repeats > 1 else "")
          + f". 1-minute load average before the benchmark: {meta['loadavg_start']:.2f}; during each run: see the "
          "table (the benchmark's own threads count ~2; more means another job shared the cores and the times "
          "are inflated by it).", "",
          f"Workload: GPT-2 (n_layer={s['n_layer']}, n_head={s['n_head']}, n_embd={s['n_embd']}, "
          f"vocab={s['vocab']}, n_positions={s['n_positions']}, no dropout, random init), {s['n_train']} training / "
          f"{s['n_query']} query documents of {s['doc_len'][0]}-{s['doc_len'][1]} tokens (seeded bigram chain), "
          f"SGD momentum {MOMENTUM}, lr {s['lr']}, batch {s['train_batch']}, {workload_info['total_steps']} steps "
          f"(per-token loss {workload_info['loss_first']:.2f} → {workload_info['loss_last']:.2f}); "
          f"C = {NUM_CHECKPOINTS} checkpoints at steps {workload_info['steps']}, L = {NUM_SEGMENTS} segments "
          f"(c_ℓ = {workload_info['total_steps'] // NUM_SEGMENTS} · {s['lr']} / (1 − {MOMENTUM}) each). SOURCE with true-Fisher EK-FAC per segment, no extra "
          f"damping, over the {4 * s['n_layer']} Conv1D layers of the transformer blocks, {bias_note}; pairwise "
          f"scores {s['n_query']} × {s['n_train']}.", "",
          "| library | run | stage | seconds | CPU s | peak RSS (MiB) | disk writes (write_bytes) | output dir | files "
          "| load during run (mean / max) |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sec = f"{r['seconds']:.2f}" if isinstance(r.get("seconds"), float) else str(r.get("seconds", ""))
        if r["stage"].startswith("total"):
            md.append(f"| {r['library']} | {r.get('run', '')} | **{r['stage']}** | **{sec}** | {r['cpu_seconds']:.1f} | "
                      f"{r['peak_rss_mib']:.0f} | {_fmt_bytes(r['write_bytes'])} | "
                      f"{_fmt_bytes(r['output_dir_bytes'])} | {r['output_files']} | "
                      f"{r['load_mean']:.2f} / {r['load_max']:.2f} |")
        else:
            md.append(f"| {r['library']} | {r.get('run', '')} | {r['stage']} | {sec} | | | | | | |")
    md += ["", "Against the issue's targets (source_fast ≥ 10× faster than Bergson, ≤ 1/10 of its disk writes)"
           + (", median-time runs" if args.repeats > 1 else "") + ":", ""]
    md += [f"- {line}" for line in summary]
    if "bergson" not in results:
        md += ["", f"Bergson was not run here ({bergson_note}); the Bergson numbers above are **quoted from the issue "
               f"(273 s, 1.1 GB), not measured on this machine**."]
    md += ["", "Notes:", "",
           "- *seconds* = the SOURCE run from constructing the analyzer / command object to the final score "
           "matrix (fit + scores), after imports and data loading; *fit* = per-segment EK-FAC (Bergson: per-checkpoint "
           "covariances, segment aggregation + eigendecomposition, per-checkpoint Λ, segment Λ); *scores* = query "
           "gradients, the walk through the segments and the scoring pass over the training set at every "
           "checkpoint (Bergson's step names are listed under its rows). source_fast calls `pairwise_scores` without "
           "`fit()` first (unless --sf-two-pass), which fits the segments last to first and scores each from the rows "
           "of its curvature passes (its task's `compute_train_loss_pair` gives the sampled- and true-label losses of "
           "one forward, by `sf.linear_nll_pair` on the last hidden states and lm_head's weight: one softmax for "
           "both losses and the draws, one lm_head product backward for both): one pass per checkpoint, so "
           "one stage. *CPU s* = user + system time of the "
           "worker and its children during the run. The CSV's process_seconds is the worker's whole life "
           "(interpreter start, imports, input preparation included).",
           "- *disk writes* = `write_bytes` of `/proc/self/io` over the timed run (children included: the kernel adds "
           "reaped children's counters to the parent's; memory-mapped writes included); *output dir* = total size "
           "of the library's output folder at the end. Bergson's input datasets (`save_to_disk`, before the timer) "
           "are not counted. Bergson keeps, per segment, the walked query gradients (50 × all weights, fp32, twice "
           "per segment) and per-checkpoint covariances and scores; source_fast keeps per-checkpoint covariances "
           "and Λ, per-segment factors and the score matrix.",
           f"- Bergson runs with `token_batch_size={args.bergson_token_batch}`: it refuses a token batch larger than "
           "the model's context (n_positions), so each of its batches holds one ~35-token document; source_fast "
           f"uses `batch_size={args.batch_size}` documents.",
           "- Layers: Bergson hooks `model.base_model` (GPT2Model), so `lm_head` is never attributed; source_fast "
           "is given the same 8 Conv1D layers. Biases: Bergson's SOURCE pipeline attributes weights only "
           "(with `include_bias=True` its per-checkpoint Λ pass builds the collector without the bias column and "
           "fails: `AssertionError: Vector shape torch.Size([1, 10, 16]) not compatible with matrix shape "
           "torch.Size([17, 17])`); source_fast always folds a layer's bias in, so the benchmark hands it each "
           "Conv1D as an equivalent bias-free `nn.Linear` followed by an untracked shift (same function, same "
           "parameters; `--sf-bias` attributes the biases too).",
           "- Both libraries sample the Fisher's labels with their own RNG (same distribution, different draws; "
           "Bergson draws with `torch.multinomial` inside its pipeline, the source_fast Task of this benchmark "
           "with `sf.sample_labels`' inverse CDF inside `sf.linear_nll_pair`, 35× faster than `torch.multinomial` on "
           "this "
           "1,000-way vocabulary): scores "
           "agree up to that noise, not bitwise. Bergson's scores are "
           "converted with τ = −Sᵀ/N (it stores loss-signed sums without the 1/N; see `_bergson_to_source_fast`).",
           "- Bergson 2.5.1 is installed by `scripts/setup_bergson_env.sh` into `.venv-bergson` (torch 2.13.0 CPU, "
           "`bergson --no-deps` and only the packages its SOURCE path imports: requirements-bergson.txt).", "",
           f"Reproduce: `bash scripts/setup_bergson_env.sh && .venv/bin/python benchmarks/bench_vs_bergson.py "
           f"--threads {args.threads} --repeats {args.repeats}`"]
    (out_dir / "vs_bergson_cpu.md").write_text("\n".join(md) + "\n")
    return csv_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both libraries (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="source_fast documents per batch (default 64)")
    parser.add_argument("--bergson-token-batch", type=int, default=None,
                        help="Bergson token_batch_size (default: n_positions, the largest it accepts)")
    parser.add_argument("--libraries", default="source_fast,bergson", help="comma list of source_fast, bergson")
    parser.add_argument("--bergson-python", default=str(DEFAULT_BERGSON_PYTHON),
                        help="interpreter of the Bergson environment (default .venv-bergson/bin/python)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); writes nothing")
    parser.add_argument("--out-dir", default=None,
                        help="where the CSV/markdown go (default benchmarks/results; --smoke: none unless given)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--sf-backend", default=None, choices=["cuda", "triton", "cpu", "torch"],
                        help="source_fast backend (default: automatic selection)")
    parser.add_argument("--sf-two-pass", action="store_true",
                        help="source_fast calls fit() before pairwise_scores (separate passes for the curvature "
                             "and the scored gradients; default: pairwise_scores alone, one pass per checkpoint)")
    parser.add_argument("--sf-bias", action="store_true",
                        help="source_fast also attributes through the biases (its default; Bergson cannot, so the "
                             "scores then differ). Default: weights only, like Bergson")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per library, alternating libraries; the median-time run is reported (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per library")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        return _process.answer(worker, args.worker)

    _process.set_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    args.sizes = sizes
    if args.bergson_token_batch is None:
        args.bergson_token_batch = sizes["n_positions"]
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    unknown = set(libraries) - {"source_fast", "bergson"}
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}")
    bergson_python = Path(args.bergson_python)
    bergson_ok, bergson_note = (False, "not requested")
    if "bergson" in libraries:
        bergson_ok, bergson_note = _bergson_status(bergson_python)
        if bergson_ok:
            version, torch_version = bergson_note.split()[:2]
            bergson_note = f"{version} (.venv-bergson, torch {torch_version})"
        print(f"bergson: {'available' if bergson_ok else 'SKIPPED'} ({bergson_note})", flush=True)
    meta = _versions(bergson_python)
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta["loadavg_start"] = os.getloadavg()[0]
    results, rows, agreement = {}, [], None
    base = {"threads": args.threads, "n_train": sizes["n_train"], "n_query": sizes["n_query"], "date": meta["date"],
            **{k: meta[k] for k in ("cpu_model", "torch_version", "transformers_version", "source_fast_commit")}}
    tmp = tempfile.mkdtemp(prefix="bench_vs_bergson_")
    try:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = prepare_workload(sizes, work, hf_checkpoints=bergson_ok)
        print(f"workload: {info['total_steps']} SGD steps, per-token loss {info['loss_first']:.3f} → "
              f"{info['loss_last']:.3f}, checkpoints at {info['steps']}", flush=True)
        plan = [("source_fast", sys.executable, args.batch_size)] if "source_fast" in libraries else []
        if bergson_ok:
            plan.append(("bergson", str(bergson_python), args.bergson_token_batch))
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):  # libraries alternate, so both see the same stretch of machine load
            for lib, python, batch in plan:
                spec = {"library": lib, "threads": args.threads, "data": str(work / "workload.pt"),
                        "work": str(work), "out_dir": str(work / f"out_{lib}"),
                        "scores_path": str(work / f"scores_{lib}.npy"), "batch_size": args.batch_size,
                        "bergson_token_batch": args.bergson_token_batch, "sf_backend": args.sf_backend,
                        "sf_bias": args.sf_bias, "sf_two_pass": args.sf_two_pass}
                res = _run_worker(python, spec, args.timeout)
                res["run"] = rep + 1
                runs.setdefault(lib, []).append(res)
                rows += [{**r, "batch": batch, "run": rep + 1} for r in _rows(lib, res, base)]
                stages = ", ".join(f"{k} {v:.2f}" for k, v in res["stages"].items() if not k.startswith("bergson:"))
                print(f"{lib:12s} run {rep + 1}: total {res['seconds']:8.2f} s ({stages})  CPU {res['cpu_seconds']:.1f} s  peak RSS "
                      f"{res['peak_rss_mib']:.0f} MiB  write_bytes {_fmt_bytes(res['write_bytes'])}  output dir "
                      f"{_fmt_bytes(res['output_dir_bytes'])} ({res['output_files']} files)  load during run "
                      f"{res['load_mean']:.2f} mean / {res['load_max']:.2f} max", flush=True)
        for lib, lib_runs in runs.items():  # the run with the median total time represents the library
            results[lib] = sorted(lib_runs, key=lambda r: r["seconds"])[(len(lib_runs) - 1) // 2]
            results[lib]["all_seconds"] = [r["seconds"] for r in lib_runs]
        if "source_fast" in results and "bergson" in results:
            agreement = compare_scores(work / "scores_source_fast.npy", work / "scores_bergson.npy", sizes["n_train"])
            print("agreement: " + json.dumps(agreement), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the scratch folder (unused when --work-dir is given)
    summary = _summary(results, agreement)
    print()
    print("\n".join(summary))
    if args.smoke:
        print("SMOKE: tiny sizes, timings are not measurements")
    partial = set(results) != {"source_fast", "bergson"}  # one library only (asked for, or Bergson missing)
    out_dir = args.out_dir if args.out_dir is not None else (None if args.smoke or partial else str(HERE / "results"))
    if out_dir is None and partial and not args.smoke:
        # The committed table compares both libraries from one run: a one-library run must not replace it.
        print("\none library only: results not written; pass --out-dir to keep them")
    if out_dir is not None and results:
        path = _write(rows, results, agreement, summary, meta, args, info, bergson_note, Path(out_dir))
        print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
