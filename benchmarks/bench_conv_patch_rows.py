"""Benchmark a conv layer's activation rows [B, positions, C·KH·KW + 1] (bias column included), which every pass
over the data builds for every tracked conv layer: csrc/conv_patch_rows (used by modules.conv_patch_rows on
float32 CPU inputs) against the torch path (F.unfold, transpose, torch.cat with a ones column).

Implementations: ``torch`` and ``cpu`` (source_fast._C.conv_patch_rows_cpu: each row written once, in order). Not
a public op: no Triton/CUDA versions (on GPUs the torch path runs).

Mode ``cnn``: 3×3 "same" convs on 128 images, the small CNN of bench_vs_kronfluence.py (3→16 at 32×32, 16→32 at
16×16) and a wider layer (64 channels at 32×32, 32 images). Bytes: the rows written once (fp32); no flop model.

    python benchmarks/bench_conv_patch_rows.py            # full run, upserts benchmarks/results/ops_<device>.csv
    python benchmarks/bench_conv_patch_rows.py --smoke    # CI: tiny shape, gate + one iteration
"""
from __future__ import annotations

import sys

import _harness as H
import torch
from _harness import case


class ConvPatchRowsBench(H.CpuPrimitiveBench):
    op = "conv_patch_rows"
    device_input = "x"

    def cases(self, device, smoke):
        if smoke:
            return [case("cnn", B=2, C=3, S=6)]
        return [case("cnn", B=128, C=3, S=32), case("cnn", B=128, C=16, S=16), case("cnn", B=32, C=64, S=32)]

    def gate_case(self, dtype):
        return case("cnn", dtype, B=3, C=2, S=7)

    def make_inputs(self, c, device):
        p = c.p
        return {"x": H.randn(H.seeded(0), p["B"], p["C"], p["S"], p["S"], device=device),
                "conv": torch.nn.Conv2d(p["C"], 8, 3, padding="same")}

    def reference(self, inputs):
        from source_fast.reference import conv_patch_rows_ref

        return conv_patch_rows_ref(inputs["conv"], inputs["x"])

    def dispatch_tensors(self, inputs):
        return {"x": inputs["x"]}

    def run_backend(self, backend, inputs):
        from source_fast import modules

        if backend == "torch":
            return modules.conv_patch_rows_torch(inputs["conv"], inputs["x"])
        from source_fast import _extension

        x, kernel, dilation, stride, pads = modules._conv_geometry(inputs["conv"], inputs["x"])
        return _extension.conv_patch_rows_cpu(x, kernel, stride, dilation, pads, True)

    def bytes(self, c):
        p = c.p
        return 4 * p["B"] * p["S"] * p["S"] * (9 * p["C"] + 1)


if __name__ == "__main__":
    sys.exit(H.main(ConvPatchRowsBench()))
