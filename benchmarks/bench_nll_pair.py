"""Benchmark source_fast.task.nll_pair: the sampled-label and the true-label cross-entropy of one forward
(a one-pass SOURCE task's `compute_train_loss_pair`), forward plus both backwards to the logits.

Implementations:
  torch          sf.nll_pair (torch ops, no kernel of its own: one softmax shared by the label draws and both
                 losses; each backward writes softmax − onehot in one pass)
  cross_entropy  the plain way: sf.sample_labels(logits), then F.cross_entropy twice (sampled labels, true
                 labels), each backpropagated to the logits
Both draw the same labels (torch.manual_seed(0) before each call); the gate compares the two logit gradients
with float64 F.cross_entropy on those labels.

Shapes: R rows (tokens) × C classes, about 1 in 10 rows ignored (label -100, as padding): the Bergson
workload's batch (R = 64 × 40, C = 1,000) and a 32k vocabulary (R = 512 × 1, C = 32,000).
Bytes: the logits read, their two gradients written (the minimum); no flop model (memory bound).

    python benchmarks/bench_nll_pair.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_nll_pair.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
import torch.nn.functional as F
from _harness import case


class NllPairBench(H.OpBench):
    op = "nll_pair"

    def cases(self, device, smoke):
        if smoke:
            return [case("lm", R=24, C=37)]
        return [case("lm", R=2560, C=1000), case("lm", R=512, C=32000)]

    def gate_case(self, dtype):
        return case("lm", dtype, R=61, C=41)

    def make_inputs(self, c, device):
        gen = H.seeded(7)
        r, classes = c.p["R"], c.p["C"]
        logits = (3 * H.randn(gen, r, classes, device=device)).to(c.torch_dtype).requires_grad_(True)
        labels = torch.randint(0, classes, (r,), generator=gen).to(device)
        labels[::10] = -100
        return {"logits": logits, "labels": labels}

    def reference(self, x):
        logits, labels = x["logits"], x["labels"]
        torch.manual_seed(0)
        from source_fast.task import sample_labels

        drawn = sample_labels(logits.detach()).masked_fill(labels == -100, -100)
        ref = logits.detach().double().requires_grad_(True)
        return tuple(torch.autograd.grad(F.cross_entropy(ref, y, ignore_index=-100, reduction="sum"), ref)[0]
                     for y in (drawn, labels))

    def unavailable(self, impl, inputs):
        return None if impl == "torch" else f"nll_pair is composed of torch ops: no {impl} implementation"

    def run_backend(self, backend, x):
        from source_fast.task import nll_pair

        torch.manual_seed(0)
        sampled, true = nll_pair(x["logits"], x["labels"])
        return (torch.autograd.grad(sampled, x["logits"], retain_graph=True)[0],
                torch.autograd.grad(true, x["logits"])[0])

    def baselines(self):
        return {"cross_entropy": plain_cross_entropy}

    def bytes(self, c):
        return 3 * c.p["R"] * c.p["C"] * H.itemsize(c.torch_dtype)


def plain_cross_entropy(x):
    """Baseline: sample_labels, then two F.cross_entropy losses on the same logits, each backpropagated."""
    from source_fast.task import sample_labels

    logits, labels = x["logits"], x["labels"]
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = sample_labels(logits).masked_fill(labels == -100, -100)
    sampled = F.cross_entropy(logits, drawn, ignore_index=-100, reduction="sum")
    true = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return (torch.autograd.grad(sampled, logits, retain_graph=True)[0], torch.autograd.grad(true, logits)[0])


if __name__ == "__main__":
    sys.exit(H.main(NllPairBench()))
