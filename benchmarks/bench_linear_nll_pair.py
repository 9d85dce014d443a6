"""Benchmark source_fast.task.linear_nll_pair: the sampled- and true-label losses of an output layer's logits
hidden @ weightᵀ, forward plus both backwards to `hidden` (a one-pass SOURCE task on a language model whose
output layer is not tracked), without keeping the logits.

Implementations:
  torch                  sf.linear_nll_pair (torch ops, its two products on CPU by the compiled GEMM of
                         source_fast._linalg: logits in row chunks of ≈ 64 MiB,
                         each chunk's softmax shared by the draws and both losses, one product backward
                         (softmax − onehot(drawn)) @ weight for both, dh_true = dh_sampled + weight[drawn] −
                         weight[true])
  nll_pair_on_logits     logits = hidden @ weightᵀ under autograd, then sf.nll_pair, each loss backpropagated
  cross_entropy          logits as above, sf.sample_labels, then F.cross_entropy twice, each backpropagated
All draw the same labels (torch.manual_seed(0) before each call; one chunk at the gate's size); the gate
compares the two gradients with respect to `hidden` with float64 F.cross_entropy on those labels.

Shapes: R rows (tokens) × H hidden → C classes, 1 in 10 rows ignored: the Bergson workload's batch (R = 2,560,
H = 64, C = 1,000) and a 32k vocabulary (R = 2,048, H = 512, C = 32,000).
Flop model: the output layer's products, 2·R·H·C forward and 2·R·H·C per backward (4·R·H·C for the torch
implementation, 6·R·H·C for the others).

    python benchmarks/bench_linear_nll_pair.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_linear_nll_pair.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
import torch.nn.functional as F
from _harness import case


class LinearNllPairBench(H.OpBench):
    op = "linear_nll_pair"

    def cases(self, device, smoke):
        if smoke:
            return [case("lm", R=24, H=8, C=37)]
        return [case("lm", R=2560, H=64, C=1000), case("lm", R=2048, H=512, C=32000)]

    def gate_case(self, dtype):
        return case("lm", dtype, R=61, H=12, C=41)

    def make_inputs(self, c, device):
        gen = H.seeded(8)
        r, h, classes = c.p["R"], c.p["H"], c.p["C"]
        hidden = H.randn(gen, r, h, device=device).to(c.torch_dtype).requires_grad_(True)
        weight = (H.randn(gen, classes, h, device=device) / h ** 0.5).to(c.torch_dtype)
        labels = torch.randint(0, classes, (r,), generator=gen).to(device)
        labels[::10] = -100
        return {"hidden": hidden, "weight": weight, "labels": labels}

    def reference(self, x):
        from source_fast.task import sample_labels

        hidden = x["hidden"].detach().double().requires_grad_(True)
        logits = hidden @ x["weight"].double().T
        torch.manual_seed(0)
        drawn = sample_labels((x["hidden"].detach() @ x["weight"].T)).masked_fill(x["labels"] == -100, -100)
        return tuple(torch.autograd.grad(F.cross_entropy(logits, y, ignore_index=-100, reduction="sum"), hidden,
                                         retain_graph=True)[0] for y in (drawn, x["labels"]))

    def unavailable(self, impl, inputs):
        return None if impl == "torch" else f"linear_nll_pair is composed of torch ops: no {impl} implementation"

    def run_backend(self, backend, x):
        from source_fast.task import linear_nll_pair

        torch.manual_seed(0)
        return _grads(linear_nll_pair(x["hidden"], x["weight"], x["labels"]), x["hidden"])

    def baselines(self):
        return {"nll_pair_on_logits": nll_pair_on_logits, "cross_entropy": plain_cross_entropy}

    def flops(self, c):
        return 4 * c.p["R"] * c.p["H"] * c.p["C"]

    def bytes(self, c):
        p = c.p
        return (2 * p["R"] * p["H"] + p["C"] * p["H"]) * H.itemsize(c.torch_dtype)


def _grads(pair, hidden):
    sampled, true = pair
    return (torch.autograd.grad(sampled, hidden, retain_graph=True)[0], torch.autograd.grad(true, hidden)[0])


def nll_pair_on_logits(x):
    """Baseline: the logits under autograd, then sf.nll_pair."""
    from source_fast.task import nll_pair

    torch.manual_seed(0)
    return _grads(nll_pair(x["hidden"] @ x["weight"].T, x["labels"]), x["hidden"])


def plain_cross_entropy(x):
    """Baseline: the logits under autograd, sample_labels, then F.cross_entropy twice."""
    from source_fast.task import sample_labels

    logits = x["hidden"] @ x["weight"].T
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = sample_labels(logits).masked_fill(x["labels"] == -100, -100)
    pair = (F.cross_entropy(logits, drawn, ignore_index=-100, reduction="sum"),
            F.cross_entropy(logits, x["labels"], ignore_index=-100, reduction="sum"))
    return _grads(pair, x["hidden"])


if __name__ == "__main__":
    sys.exit(H.main(LinearNllPairBench()))
