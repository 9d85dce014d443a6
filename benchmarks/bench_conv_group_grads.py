"""Benchmark the per-example gradients of a depthwise convolution's groups (per image and channel, Σ over output
positions of the output gradient times the channel's 3×3 patch, and the gradient's sum for the bias), which every
use of such a layer's rows through G_n forms (the eigen-correction, scoring, the row caches' kept G_n):
csrc/conv_group_grads (used by modules.one_channel_group_grads on float32 CPU inputs of at least
GROUP_GRADS_MIN_POSITIONS output positions; no patch rows) against the torch path (one grouped convolution of every
(image, channel) with its own output gradient as the kernel).

Implementations: ``torch`` and ``cpu`` (source_fast._C.conv_group_grads_cpu). Not a public op: no Triton/CUDA
versions (on GPUs the pipeline builds the groups' patch rows).

Mode ``depthwise``: 3×3 "same" depthwise convs on 128 images, the depthwise-separable CNN of docs/PERFORMANCE.md
(32 channels at 32×32, 64 at 16×16, 128 at 8×8). Bytes: the input and the output gradient read once (fp32); flops:
2·B·C·positions·10.

    python benchmarks/bench_conv_group_grads.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_conv_group_grads.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class ConvGroupGradsBench(H.CpuPrimitiveBench):
    op = "conv_group_grads"
    device_input = "x"

    def cases(self, device, smoke):
        if smoke:
            return [case("depthwise", B=2, C=3, S=6)]
        return [case("depthwise", B=128, C=32, S=32), case("depthwise", B=128, C=64, S=16),
                case("depthwise", B=128, C=128, S=8)]

    def gate_case(self, dtype):
        return case("depthwise", dtype, B=3, C=2, S=7)

    def make_inputs(self, c, device):
        p = c.p
        gen = H.seeded(0)
        return {"x": H.randn(gen, p["B"], p["C"], p["S"], p["S"], device=device),
                "gy": H.randn(gen, p["B"], p["C"], p["S"], p["S"], device=device),
                "conv": torch.nn.Conv2d(p["C"], p["C"], 3, padding="same", groups=p["C"])}

    def reference(self, inputs):
        from source_fast.reference import conv_group_grads_ref

        return conv_group_grads_ref(inputs["conv"], inputs["x"], inputs["gy"])

    def dispatch_tensors(self, inputs):
        return {"x": inputs["x"]}

    def run_backend(self, backend, inputs):
        from source_fast import modules

        if backend == "torch":
            return modules.one_channel_group_grads_torch(inputs["conv"], inputs["x"], inputs["gy"])
        from source_fast import _extension

        x, kernel, dilation, stride, pads = modules._conv_geometry(inputs["conv"], inputs["x"])
        return _extension.conv_group_grads_cpu(x, inputs["gy"], kernel, stride, dilation, pads, True)

    def flops(self, c):
        p = c.p
        return 2 * p["B"] * p["C"] * p["S"] * p["S"] * 10

    def bytes(self, c):
        p = c.p
        return 2 * 4 * p["B"] * p["C"] * p["S"] * p["S"]


if __name__ == "__main__":
    sys.exit(H.main(ConvGroupGradsBench()))
