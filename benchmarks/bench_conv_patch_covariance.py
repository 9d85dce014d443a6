"""Benchmark the activation covariances of a depthwise convolution's groups (per input channel, Σ r rᵀ over images
and output positions of its 3×3 patch and the bias 1), which every covariance pass builds for such a layer:
csrc/conv_patch_covariance (used by modules.conv_patch_covariance on float32 CPU inputs; no patch rows written)
against the torch path (F.unfold of all channels and a batched product per channel).

Implementations: ``torch`` and ``cpu`` (source_fast._C.conv_patch_covariance_cpu). Not a public op: no
Triton/CUDA versions (on GPUs the pipeline builds the groups' patch rows).

Mode ``depthwise``: 3×3 "same" depthwise convs on 128 images, the depthwise-separable CNN of docs/PERFORMANCE.md
(32 channels at 32×32, 64 at 16×16, 128 at 8×8). Bytes: the input read once (fp32); flops: 2·B·C·positions·D²
(the full [D, D] product a patch-row GEMM would do; the kernel forms its lower triangle).

    python benchmarks/bench_conv_patch_covariance.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_conv_patch_covariance.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class ConvPatchCovarianceBench(H.CpuPrimitiveBench):
    op = "conv_patch_covariance"
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
        return {"x": H.randn(H.seeded(0), p["B"], p["C"], p["S"], p["S"], device=device),
                "conv": torch.nn.Conv2d(p["C"], p["C"], 3, padding="same", groups=p["C"])}

    def reference(self, inputs):
        from source_fast.reference import conv_patch_covariance_ref

        return conv_patch_covariance_ref(inputs["conv"], inputs["x"])

    def dispatch_tensors(self, inputs):
        return {"x": inputs["x"]}

    def run_backend(self, backend, inputs):
        from source_fast import modules

        if backend == "torch":
            return modules.conv_patch_covariance_torch(inputs["conv"], inputs["x"])
        from source_fast import _extension

        x, kernel, dilation, stride, pads = modules._conv_geometry(inputs["conv"], inputs["x"])
        return _extension.conv_patch_covariance_cpu(x, kernel, stride, dilation, pads, True)

    def flops(self, c):
        p = c.p
        return 2 * p["B"] * p["C"] * p["S"] * p["S"] * 10 * 10

    def bytes(self, c):
        p = c.p
        return 4 * p["B"] * p["C"] * p["S"] * p["S"]


if __name__ == "__main__":
    sys.exit(H.main(ConvPatchCovarianceBench()))
