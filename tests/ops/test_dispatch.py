"""Backend selection (source_fast/_dispatch.py): explicit vs automatic, the env override, `explain`,
and the first-use numerical self-test that disables a backend returning wrong numbers."""
import warnings

import pytest
import torch

from _backends import available_backends, interpreting
from source_fast import _dispatch, ops, reference


@pytest.fixture(autouse=True)
def _clean_dispatch_state(monkeypatch):
    """No env override, and self-test/disable bookkeeping private to each test."""
    monkeypatch.delenv("SOURCE_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_disabled", {})
    monkeypatch.setattr(_dispatch, "_self_tested", set())
    monkeypatch.setattr(_dispatch, "_logged", set())


class _FakeBackend(_dispatch.Backend):
    """A CPU backend whose covariance is whatever function the test gives it."""

    name = "fake"
    devices = ("cpu",)

    def __init__(self, fn):
        self._fn = fn

    def function(self, op):
        return self._fn


def _install(monkeypatch, fn):
    fake = _FakeBackend(fn)
    monkeypatch.setattr(_dispatch, "BACKENDS", {"fake": fake, **_dispatch.BACKENDS})
    return fake


def test_explicit_backend_that_cannot_run_lists_every_reason():
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as info:
        ops.covariance(x, backend="triton")
    message = str(info.value)
    assert "backend 'triton' cannot run covariance" in message
    assert "(5, 3)" in message and "torch.float64" in message  # the inputs
    assert "All backends:" in message
    for name in _dispatch.BACKENDS:
        assert f"\n{name:8s} |" in message  # one table row per backend


def test_explicit_cuda_on_cpu_tensors_raises():
    with pytest.raises(NotImplementedError, match="backend 'cuda' cannot run lambda_accum"):
        a, g = torch.randn(2, 1, 3), torch.randn(2, 1, 4)
        ops.lambda_accum(a, g, torch.eye(3), torch.eye(4), backend="cuda")


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.covariance(torch.randn(3, 2), backend="tpu")


def test_auto_falls_back_to_torch_on_cpu():
    x64 = torch.randn(6, 4, dtype=torch.float64)
    name, _ = _dispatch.select("covariance", {"x": x64})
    assert name == "torch"  # no other backend takes float64 on CPU
    x32 = x64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a partially built extension may disable itself
        name, _ = _dispatch.select("covariance", {"x": x32})
    assert name in ("cpu", "torch")  # never the Triton interpreter unless asked for by name
    torch.testing.assert_close(ops.covariance(x64), reference.covariance_ref(x64))


def test_narrow_unmasked_covariance_goes_to_torch_on_cpu():
    """The C++ covariance measured slower than torch on unmasked factors of <= 32 columns: the automatic choice
    takes torch there (the reason in explain), the C++ kernel elsewhere, and backend="cpu" still runs it."""
    if "cpu" not in available_backends():
        pytest.skip("the C++ backend is not built")
    limit = _dispatch.COVARIANCE_TORCH_MAX_D
    narrow, wide = torch.randn(300, limit), torch.randn(300, limit + 1)
    mask = torch.rand(300) > 0.5
    assert _dispatch.select("covariance", {"x": narrow})[0] == "torch"
    assert _dispatch.select("covariance", {"x": wide})[0] == "cpu"
    assert _dispatch.select("covariance", {"x": narrow, "mask": mask})[0] == "cpu"
    assert _dispatch.select("covariance", {"x": narrow})[0] == "torch"  # the cached choice keeps the shape apart
    assert "no mask: the C++ covariance measured slower" in _dispatch.explain("covariance", {"x": narrow})
    assert _dispatch.select("covariance", {"x": narrow}, backend="cpu")[0] == "cpu"
    torch.testing.assert_close(ops.covariance(narrow, backend="cpu"), ops.covariance(narrow), rtol=1e-5, atol=1e-4)


@pytest.mark.interpreter
def test_triton_interpreter_runs_only_when_named():
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton interpreter not available")
    assert interpreting()
    x = torch.randn(9, 5)
    name, _ = _dispatch.select("covariance", {"x": x}, backend="triton")
    assert name == "triton"
    rows = {line.split("|")[0].strip(): line.split("|", 1)[1].strip()
            for line in _dispatch.explain("covariance", {"x": x}).splitlines()[1:]}
    assert rows["triton"].startswith("skipped:")  # auto mode never picks the interpreter


def test_explain_table():
    x = torch.randn(8, 3, dtype=torch.float64)
    table = ops.explain("covariance", x)
    lines = table.splitlines()
    assert lines[0].startswith("backend") and len(lines) == 1 + len(_dispatch.BACKENDS)
    rows = {line.split("|")[0].strip(): line.split("|", 1)[1].strip() for line in lines[1:]}
    assert rows["torch"] == "selected"
    assert rows["triton"].startswith("skipped:")
    assert sum(status == "selected" for status in rows.values()) == 1
    v, a, g = torch.randn(2, 3, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 3)
    assert "selected" in ops.explain("score_pairwise", v, a, g)
    assert "selected" in ops.explain("score_pairwise", v=v, a=a, g=g)
    with pytest.raises(ValueError, match="op must be one of"):
        ops.explain("not_an_op", x)


@pytest.mark.parametrize("t,sparse", [(1, False), (12, False), (2, True), (1, "a and g")],
                         ids=["tokenwise", "materialized", "sparse-g", "sparse-ag"])
def test_explain_names_the_score_pairwise_form_that_runs(t, sparse):
    """For score_pairwise, explain adds the selected backend's form, and on CPU it is the kernel that then runs
    (recorded calls into the compiled module): token-wise, materialised, sparse g or sparse a and g."""
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the compiled CPU backend is not built")
    from _backends import recording_lib_calls
    from source_fast import _extension

    gen = torch.Generator().manual_seed(0)
    v, a, g = torch.randn(40, 48, 37, generator=gen), torch.randn(300, t, 37, generator=gen), torch.randn(300, t, 48)
    if sparse:
        g = g * (torch.rand(300, 1, 48, generator=gen) < 0.3)
    if sparse == "a and g":
        a = a * (torch.rand(300, 1, 37, generator=gen) < 0.3)
    form = ops.explain("score_pairwise", v, a, g).splitlines()[-1]
    with recording_lib_calls() as calls:
        ops.score_pairwise(v, a, g)
    kernels = {name for name, _ in calls if name.startswith("score_pairwise")}
    assert len(kernels) == 1 and form == f"form     | cpu: {_extension.CPU_PAIRWISE_KERNELS[kernels.pop()]}", form
    expected = "sparse a and g" if sparse == "a and g" else {1: "token-wise", 12: "materialised", 2: "sparse g"}[t]
    assert expected in form
    # float64 goes to the torch backend, whose flop model picks the form
    table = ops.explain("score_pairwise", v.double(), a.double(), g.double())
    assert table.splitlines()[-1].startswith("form     | torch:")
    # inputs of the wrong rank: the table without a form line (the op itself names the bad argument)
    assert "form" not in ops.explain("score_pairwise", v[0], a, g)


def test_triton_score_pairwise_form_follows_the_tables(blocks_override):
    """The Triton form (what explain reports and what score_pairwise_triton runs): fp32 one token token-wise, 16-bit
    one token formed on chip, a few tokens formed, more materialised, or fused where the table turns that on."""
    pytest.importorskip("triton")
    from source_fast.kernels import score_pairwise as kernel

    def form(t, dtype):
        return kernel.pairwise_form(64, 512, t, (dtype,) * 3)[0]

    assert form(1, torch.float32) == "tokenwise" and form(1, torch.float16) == "formed"
    assert form(3, torch.float16) == "formed" and form(12, torch.float16) == "materialized"
    blocks_override({"PAIRWISE_MMA_FORMED_GPU_BLOCKS": {"1": [16, 128, 64, 16, 8, 128, 1, 1, 8, 3]}})
    assert form(12, torch.float16) == "fused" and form(17, torch.float16) == "materialized"
    assert form(12, torch.float32) == "materialized"
    tensors = {"v": torch.empty(4, 6, 7, dtype=torch.float16), "a": torch.empty(5, 12, 7, dtype=torch.float16),
               "g": torch.empty(5, 12, 6, dtype=torch.float16)}
    assert _dispatch.BACKENDS["triton"].form("score_pairwise", tensors) == f"fused: {kernel.FORMS['fused']}"
    assert _dispatch.BACKENDS["triton"].form("covariance", {"x": torch.empty(3, 3)}) is None


def test_env_override(monkeypatch):
    x32 = torch.randn(6, 4)
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "torch")
    assert _dispatch.select("covariance", {"x": x32})[0] == "torch"
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run covariance"):
        ops.covariance(x32.double())  # the override is an explicit choice: it raises, never falls back
    assert _dispatch.select("covariance", {"x": x32}, backend="torch")[0] == "torch"  # keyword wins
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SOURCE_FAST_BACKEND"):
        ops.covariance(x32)


def test_working_backend_passes_self_test_and_is_selected(monkeypatch):
    _install(monkeypatch, lambda x, mask=None, out=None: reference.covariance_ref(x, mask).float())
    x = torch.randn(10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        name, _ = _dispatch.select("covariance", {"x": x})
    assert name == "fake"
    assert ("fake", "covariance", "cpu") in _dispatch._self_tested


def test_self_test_checks_bf16_scoring_where_its_kernels_differ():
    """On a CUDA device score_pairwise's self-test also runs bf16 inputs (the tensor-core kernels are others than
    fp32's), at a few tokens and at more than a formed tile holds: a backend right in fp32 but wrong in bf16, in
    either form, is reported; a right one passes at bf16's tolerance."""
    from source_fast import _selftest

    def right(v, a, g):
        return reference.score_pairwise_ref(v, a, g).float()

    def wrong_in_bf16(v, a, g):
        return right(v, a, g) * (1.1 if v.dtype == torch.bfloat16 else 1.0)

    def bf16_rounded_g(v, a, g):  # what the 16-bit kernels do: G_n formed in fp32, rounded to the inputs' dtype
        grads = torch.einsum("nto,nti->noi", g.double(), a.double()).to(v.dtype).double()
        return torch.einsum("qoi,noi->qn", v.double(), grads).float()

    def wrong_above_formed_tiles(v, a, g):  # the several-token forms (materialised or fused) broken, not the formed one
        return right(v, a, g) * (1.1 if v.dtype == torch.bfloat16 and a.shape[1] > 8 else 1.0)

    cpu = torch.device("cpu")
    assert _selftest.run("score_pairwise", wrong_in_bf16, cpu) is None  # CPU default: fp32 only
    assert "bfloat16 inputs, 3 tokens: max error" in _selftest.run("score_pairwise", wrong_in_bf16, cpu,
                                                                   sixteen_bit=True)
    assert "bfloat16 inputs, 12 tokens: max error" in _selftest.run("score_pairwise", wrong_above_formed_tiles, cpu,
                                                                    sixteen_bit=True)
    assert _selftest.run("score_pairwise", right, cpu, sixteen_bit=True) is None
    assert _selftest.run("score_pairwise", bf16_rounded_g, cpu, sixteen_bit=True) is None


def test_self_test_uses_fp16_before_sm80(monkeypatch):
    """GPUs without bf16 products (before sm_80) get the 16-bit check in fp16: a backend is not disabled there for
    a dtype the device cannot run."""
    from source_fast import _selftest

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert _selftest._sixteen_bit_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _selftest._sixteen_bit_dtype("cuda") == torch.bfloat16
    assert _selftest._sixteen_bit_dtype("cpu") == torch.bfloat16


def test_wrong_numbers_disable_backend_with_warning(monkeypatch):
    _install(monkeypatch, lambda x, mask=None, out=None: reference.covariance_ref(x, mask).float() * 1.01)
    x = torch.randn(10, 4)
    with pytest.warns(RuntimeWarning, match="backend 'fake' disabled for covariance"):
        name, fn = _dispatch.select("covariance", {"x": x})
    assert name != "fake"  # auto mode fell through to a working backend
    torch.testing.assert_close(fn(x, None, None).double(), reference.covariance_ref(x), rtol=1e-5, atol=1e-5)
    assert "max error" in _dispatch._disabled[("fake", "covariance")]
    with pytest.raises(NotImplementedError, match="disabled after a failed numerical self-test"):
        ops.covariance(x, backend="fake")
    assert "fake     | skipped: disabled" in _dispatch.explain("covariance", {"x": x})
    # other ops of the same backend are unaffected
    assert ("fake", "lambda_accum") not in _dispatch._disabled


def test_raising_backend_is_disabled(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel launch failed")

    _install(monkeypatch, broken)
    x = torch.randn(10, 4)
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: kernel launch failed"):
        name, _ = _dispatch.select("covariance", {"x": x})
    assert name != "fake"


def test_explicit_request_of_a_broken_backend_raises(monkeypatch):
    _install(monkeypatch, lambda x, mask=None, out=None: torch.zeros(x.shape[1], x.shape[1]))
    x = torch.randn(10, 4)
    with pytest.warns(RuntimeWarning, match="disabled"):
        with pytest.raises(NotImplementedError, match="fake"):
            ops.covariance(x, backend="fake")


# ---------------------------------------------------------------------------------------------
# Measured GPU dispatch: skip a compiled backend the committed benchmarks found slower than torch
# ---------------------------------------------------------------------------------------------

_TABLE = {("score_pairwise", "cuda", "float32", "T=1"): 0.27, ("score_pairwise", "triton", "float32", "T>1"): 1.4,
          ("covariance", "triton", "bfloat16", "mask"): 0.5, ("kron_project", "cuda", "float32", ""): 0.9}


@pytest.fixture
def measured(monkeypatch):
    from source_fast import _measured_gpu

    monkeypatch.setattr(_measured_gpu, "SPEEDUP_VS_TORCH", _TABLE)
    return _measured_gpu


def test_measured_slowdown_reads_op_dtype_and_regime(measured):
    a1, g1, v = torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), torch.zeros(1, 4, 3)
    why = _dispatch.measured_slowdown("score_pairwise", "cuda", {"v": v, "a": a1, "g": g1})
    assert why and "0.27x" in why and "float32, T=1" in why and "backend='cuda'" in why
    a2, g2 = torch.zeros(2, 5, 3), torch.zeros(2, 5, 4)
    assert _dispatch.measured_slowdown("score_pairwise", "cuda", {"v": v, "a": a2, "g": g2}) is None  # unmeasured
    assert _dispatch.measured_slowdown("score_pairwise", "triton", {"v": v, "a": a2, "g": g2}) is None  # faster
    x16 = torch.zeros(3, 3, dtype=torch.float16)  # fp16 reads the bf16 entry
    assert "0.50x" in _dispatch.measured_slowdown("covariance", "triton", {"x": x16, "mask": torch.ones(3)})
    assert _dispatch.measured_slowdown("covariance", "triton", {"x": x16}) is None  # nomask: unmeasured
    assert "0.90x" in _dispatch.measured_slowdown("kron_project", "cuda", {"v": torch.zeros(1, 2, 2)})


def test_measured_dispatch_leaves_cpu_tensors_alone(measured, monkeypatch):
    """The rule is for CUDA tensors only: a CPU call sees no measured reasons for any backend."""
    v, a, g = torch.randn(2, 4, 3), torch.randn(5, 1, 3), torch.randn(5, 1, 4)
    monkeypatch.setitem(_TABLE, ("score_pairwise", "cpu", "float32", "T=1"), 0.1)
    assert not any("measured" in r for r in _dispatch.BACKENDS["cpu"].not_supported_reasons(
        "score_pairwise", {"v": v, "a": a, "g": g}))


def test_committed_dispatch_table_is_generated_from_the_committed_benchmarks():
    """source_fast/_measured_gpu.py is regenerated, never edited: it equals the generator's output on the CSV."""
    import csv
    from pathlib import Path

    import source_fast

    root = Path(__file__).resolve().parents[2]
    gen = _load_generator()
    module = Path(source_fast.__file__).parent / "_measured_gpu.py"
    first = module.read_text().splitlines()[0]
    csv_name = first.split("benchmarks/results/")[1].split(";")[0]
    with open(root / "benchmarks" / "results" / csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    assert module.read_text() == gen.render(rows, csv_name)


@pytest.mark.gpu
def test_auto_on_cuda_skips_backends_measured_slower(measured, monkeypatch):
    v, a, g = (torch.randn(*s, device="cuda") for s in ((2, 4, 3), (5, 1, 3), (5, 1, 4)))
    monkeypatch.setitem(_TABLE, ("score_pairwise", "triton", "float32", "T=1"), 0.05)
    name, _ = _dispatch.select("score_pairwise", {"v": v, "a": a, "g": g})
    assert name == "torch"
    assert "measured at 0.27x" in ops.explain("score_pairwise", v, a, g)
    if "cuda" in available_backends("cuda"):
        assert _dispatch.select("score_pairwise", {"v": v, "a": a, "g": g}, backend="cuda")[0] == "cuda"
        monkeypatch.setenv("SOURCE_FAST_MEASURED_DISPATCH", "0")
        assert _dispatch.select("score_pairwise", {"v": v, "a": a, "g": g})[0] == "cuda"


def test_automatic_choice_is_cached_even_after_skipped_backends(monkeypatch):
    """Identical calls (the pipeline makes thousands) reuse the first choice without asking any backend again,
    also when higher-priority backends were skipped on the way (the cache key was once overwritten there)."""
    x = torch.randn(9, 4)
    first = _dispatch.select("covariance", {"x": x})
    asked = []
    original = _dispatch.Backend.not_supported_reasons
    monkeypatch.setattr(_dispatch.Backend, "not_supported_reasons",
                        lambda self, *a, **k: asked.append(self.name) or original(self, *a, **k))
    assert _dispatch.select("covariance", {"x": torch.randn(5, 4)}) == first
    assert asked == []


def _load_generator():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "make_dispatch_table.py"
    spec = importlib.util.spec_from_file_location("make_dispatch_table", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_dispatch_table_regimes_and_time_weighted_speedups():
    """Bench modes map to the dispatcher's regimes (also "T=1,R=8" and "T=1 g half zeros"), and a speed is the
    torch backend's total time over the backend's, so large shapes decide."""
    gen = _load_generator()
    assert [gen.regime("score_lowrank", m) for m in ("T=1,R=8", "T=16,R=32")] == ["T=1", "T>1"]
    assert [gen.regime("score_pairwise", m) for m in ("T=1 g half zeros", "T=2 g half zeros, same", "T=16")] \
        == ["T=1", "T>1", "T>1"]
    assert [gen.regime("covariance", m) for m in ("mask", "nomask")] == ["mask", "nomask"]
    assert gen.regime("kron_project", "fns=2(r,s)") == ""
    assert gen.regime("lambda_accum", "conv positions") == "G first"

    def row(backend, shape, ms, status="ok"):
        return {"op": "score_self", "backend": backend, "mode": "T=1", "dtype": "float32", "shape_params": shape,
                "ms_p50": str(ms), "status": status}

    rows = [row("torch", "small", 1.0), row("triton", "small", 0.1),     # 10x faster on a tiny shape
            row("torch", "large", 100.0), row("triton", "large", 200.0),  # 2x slower where the time goes
            row("cuda", "large", 1.0, status="ERROR: boom")]              # failed rows are ignored
    assert gen.speedups(rows) == {("score_self", "triton", "float32", "T=1"): round(101.0 / 200.1, 3)}


def test_conv_position_cases_are_the_g_first_regime():
    """The benchmarks' "conv positions" cases (CPU and CUDA lists) are shapes where the torch backend forms G_n
    first, and the dispatcher files such inputs under the same "G first" regime the table generator gives them."""
    import sys
    from pathlib import Path

    from source_fast import _torch_ops

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import _harness
    finally:
        sys.path.pop(0)
    cases = [c for c in _harness.gpu_conv_cases() if c.torch_dtype == torch.float32]
    assert cases
    for c in cases:
        p = c.p
        assert _torch_ops.rotation_order(p["T"], p["O"], p["I"]) == "materialize"
        a, g = torch.empty(1, p["T"], p["I"], device="meta"), torch.empty(1, p["T"], p["O"], device="meta")
        assert _dispatch.regime("lambda_accum", {"a": a, "g": g}) == "G first"
        assert _dispatch.regime("score_self", {"a": a, "g": g}) == "G first"
    a, g = torch.empty(1, 35, 65, device="meta"), torch.empty(1, 35, 192, device="meta")  # a transformer's rows
    assert _dispatch.regime("lambda_accum", {"a": a, "g": g}) == "T>1"
    assert _dispatch.regime("score_pairwise", {"a": torch.empty(1, 1024, 28, device="meta"), "g": a}) == "T>1"


@pytest.mark.parametrize("op", ["lambda_accum", "score_self"])
def test_explain_names_the_rotation_order(op):
    """lambda_accum and score_self on the torch/cpu backends: explain says whether G_n is formed first (a conv
    layer's many positions on a narrow layer) or the token rows are rotated first (a transformer's rows)."""
    def tensors(t, o, i):
        a, g = torch.randn(2, t, i), torch.randn(2, t, o)
        q_a, q_s = torch.eye(i), torch.eye(o)
        if op == "lambda_accum":
            return a, g, q_a, q_s
        return a, g, q_s, q_a, torch.ones(o, i)

    conv = ops.explain(op, *tensors(256, 32, 145)).splitlines()[-1]
    assert conv.startswith("form") and "G_n formed first" in conv, conv
    rows = ops.explain(op, *tensors(35, 192, 65)).splitlines()[-1]
    assert "token rows rotated first" in rows, rows
    assert "one token" in ops.explain(op, *tensors(1, 8, 9)).splitlines()[-1]
