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
