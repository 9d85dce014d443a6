"""Ahead-of-time builds of the Triton kernels for NVIDIA GPUs, on a machine without one.

Triton's compiler and the `cuobjdump` its wheel bundles need no GPU: a kernel compiled for sm_90 (or sm_80) can
be read instruction by instruction. What makes a Triton kernel fast on Hopper and shows in its build: no
register spills (stack 0), asynchronous copies (LDGSTS / UTMALDG: loads the software pipeliner overlaps with the
dots), wgmma (HGMMA) for 16-bit dots and which operand it reads from registers, and the loop structure (Triton
pipelines only innermost loops). The tests assert these (tests/_backends.py); benchmarks/sm90_builds.py prints
them for every kernel's GPU tiles.

A case is (module, kernel name, {argument: type}, {constexpr: value}, arch[, options]): options are compile
options (num_warps, num_stages) plus "div16", the integer and pointer arguments the launcher guarantees to be
multiples of 16 (what Triton's JIT specialises on: without them no load is vectorised). Unit strides go in the
constexprs (the JIT specialises integers equal to 1 as constants).

The compile runs in a subprocess (`python -m source_fast.kernels._aot '<json cases>'`) without
TRITON_INTERPRET: the interpreter accepts code the compiler rejects, and it must not be active.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

# Reported counts of SASS opcodes.
OPCODES = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "FFMA")


def _sass_report(sass: str, usage: str) -> dict | None:
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if not m:
        return None
    ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    branches = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass)
    loops = [(int(target, 16), int(at, 16)) for at, target in branches if int(target, 16) < int(at, 16)]
    innermost = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    local = [int(at, 16) for at in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(?:LDL|STL)\b", sass)]
    return {
        "reg": int(m.group(1)), "stack": int(m.group(2)), **{k: ops.get(k, 0) for k in OPCODES},
        # wgmma whose left operand is read from registers (else from shared memory)
        "HGMMA_REG_A": len(re.findall(r"HGMMA\.\S+\s+R\d+,\s*R\d+,", sass)),
        # the wgmma shapes (M x N x K) the build uses
        "wgmma": sorted(set(re.findall(r"HGMMA\.(\d+x\d+x\d+)", sass))),
        # loops: branches back to a lower address (not the trailing branch-to-self)
        "LOOPS": len(loops),
        # spill traffic (local loads/stores) inside an innermost loop: paid every step of the pipelined loop
        "SPILL_IN_LOOP": sum(any(start <= at <= end for start, end in innermost) for at in local),
    }


def _build(cases: list) -> list[dict | None]:
    """Compile each case in this process (TRITON_INTERPRET must be unset) and read its build."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    reports = []
    for module, kernel, signature, constexprs, arch, *options in cases:
        fn = getattr(importlib.import_module(module), kernel)
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        options = dict(options[0]) if options else {}
        attrs = {(list(fn.arg_names).index(name),): [["tt.divisibility", 16]] for name in options.pop("div16", [])}
        compiled = tcompile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options or None)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"{kernel} {constexprs}: no cubin in the build")
        report = None
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
            report = _sass_report(sass, usage)
            if report is not None:
                report["shared"] = int(getattr(compiled.metadata, "shared", 0))  # bytes, dynamic
        reports.append(report)
    return reports


def compile_for_gpu(cases: list, timeout: float = 240.0) -> list[dict | None]:
    """Build each case for its NVIDIA target in a subprocess and return per case its report: "reg", "stack"
    (bytes of spills), counts of OPCODES, "HGMMA_REG_A", "wgmma" shapes, "LOOPS", "SPILL_IN_LOOP" (local loads and
    stores inside an innermost loop) and "shared" (dynamic shared
    memory, bytes); None where the wheel bundles no cuobjdump. Raises RuntimeError with the compiler's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "source_fast.kernels._aot", json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"Triton compile for GPU failed:\n{proc.stderr[-6000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORTS ")][-1]
    return json.loads(line[len("REPORTS "):])


if __name__ == "__main__":
    print("REPORTS " + json.dumps(_build(json.loads(sys.argv[1]))))
