"""kernels/_blocks.py: the GPU tile tables, their measured overrides, and the tuner that measures them
(benchmarks/tune_triton.py), checked on CPU (every candidate tile computes the right numbers under the
interpreter)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from source_fast.kernels import _blocks

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("SOURCE_FAST_TRITON_BLOCKS", raising=False)
    _blocks.override_blocks(None)
    yield
    _blocks.override_blocks(None)
    _blocks._device_cache.clear()  # a test may have patched the measured tables


def test_defaults_without_overrides():
    assert _blocks.gpu_blocks("COVARIANCE_GPU_BLOCKS", "wide") == _blocks.COVARIANCE_GPU_BLOCKS["wide"]
    assert _blocks.gpu_blocks("PAIRWISE_GPU_BLOCKS", 2) == _blocks.PAIRWISE_GPU_BLOCKS[2]


@pytest.mark.interpreter
def test_forced_entry_applies_even_under_the_interpreter():
    assert _blocks.interpreting()
    fitted = _blocks.covariance_blocks(100, 40)
    _blocks.override_blocks({"COVARIANCE_GPU_BLOCKS": {"narrow": [64, 256, 8]}})
    assert _blocks.covariance_blocks(100, 40) == (64, 256, 8)
    assert _blocks.covariance_blocks(100, 80) == _blocks.covariance_blocks(100, 80)  # "wide" not forced
    _blocks.override_blocks({"PAIRWISE_GPU_BLOCKS": {"1": [[32, 16, 16, 1, 4, 2], [16, 16, 16, 4, 4, 2]]}})
    assert _blocks.pairwise_blocks(5, 7, 1, 37, 1) == _blocks.PairwiseConfig(32, 16, 16, 1, 4, 2)
    assert _blocks.pairwise_blocks(5, 7, 3, 37, 1) == _blocks.PairwiseConfig(16, 16, 16, 4, 4, 2)
    _blocks.override_blocks(None)
    assert _blocks.covariance_blocks(100, 40) == fitted


def test_gemm_tiles_shrink_to_small_matrices(monkeypatch):
    """On a GPU the GEMM's table entry is a cap: a small matrix takes no wider tile than it needs (64 rows and
    columns at least: one warpgroup's wgmma), with 4 warps at 64 × 64, and a GEMM of few K steps at most 128
    columns; a forced tile is taken as it is."""
    monkeypatch.setattr(_blocks, "interpreting", lambda: False)
    assert _blocks.gemm_blocks(65536, 1040, 1040, 2) == _blocks.GEMM_GPU_BLOCKS[2] == (128, 128, 64, 8)
    assert _blocks.gemm_blocks(40, 1000, 20, 2) == (64, 128, 32, 8)
    assert _blocks.gemm_blocks(64, 33, 64, 1) == (64, 64, 64, 4)
    with monkeypatch.context() as m:
        m.setattr(_blocks, "gpu_blocks", lambda table, key: (128, 256, 64, 8))  # as measured on the H100
        assert _blocks.gemm_blocks(1024, 1025, 1040, 2) == (128, 256, 64, 8)
        assert _blocks.gemm_blocks(1024, 1025, 16, 2) == (128, 128, 16, 8)  # K = 16 tokens: store-bound
    _blocks.override_blocks({"GEMM_GPU_BLOCKS": {"2": [128, 128, 64, 8]}})
    assert _blocks.gemm_blocks(40, 1000, 20, 2) == (128, 128, 64, 8)


def test_arch_defaults_sit_between_measured_choices_and_the_defaults(monkeypatch):
    """An sm_8x device takes ARCH_BLOCKS["sm_80"] where given (tiles that spill there otherwise), the defaults
    elsewhere; a forced entry still wins; sm_90 takes the defaults."""
    monkeypatch.setattr(_blocks, "device_arch", lambda: "sm_80")
    sm80 = _blocks.ARCH_BLOCKS["sm_80"]
    assert _blocks.gpu_blocks("PER_TOKEN_GPU_BLOCKS", 2) == sm80["PER_TOKEN_GPU_BLOCKS"][2]
    assert _blocks.gpu_blocks("PER_TOKEN_GPU_BLOCKS", 0) == _blocks.PER_TOKEN_GPU_BLOCKS[0]  # no sm_80 entry
    assert _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 2) == _blocks.GEMM_GPU_BLOCKS[2]
    _blocks.override_blocks({"PER_TOKEN_GPU_BLOCKS": {"2": [64, 64, 32, 4, 3]}})
    assert _blocks.gpu_blocks("PER_TOKEN_GPU_BLOCKS", 2) == (64, 64, 32, 4, 3)
    _blocks.override_blocks(None)
    monkeypatch.setattr(_blocks, "device_arch", lambda: "sm_90")
    from source_fast.kernels import _tuned_blocks

    measured = _tuned_blocks.TUNED.get("sm_90", {}).get("best", {}).get("PER_TOKEN_GPU_BLOCKS", {}).get("2")
    want = tuple(measured) if measured else _blocks.PER_TOKEN_GPU_BLOCKS[2]
    assert _blocks.gpu_blocks("PER_TOKEN_GPU_BLOCKS", 2) == want  # measured on sm_90 where tuned, else the default
    assert _blocks.gpu_blocks("PAIR_GPU_BLOCKS", 0) == _blocks.PAIR_GPU_BLOCKS[0]  # never tuned: the default
    monkeypatch.setattr(_tuned_blocks, "TUNED", {"sm_90": {"best": {"PER_TOKEN_GPU_BLOCKS": {"2": [64, 64, 16, 4, 2]}}}})
    _blocks._device_cache.clear()
    assert _blocks.gpu_blocks("PER_TOKEN_GPU_BLOCKS", 2) == (64, 64, 16, 4, 2)


def test_tuning_file_named_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"device": "X", "best": {"GEMM_GPU_BLOCKS": {"2": [64, 128, 32, 4]}}}))
    monkeypatch.setenv("SOURCE_FAST_TRITON_BLOCKS", str(path))
    assert _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 2) == (64, 128, 32, 4)
    assert _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 0) == _blocks.GEMM_GPU_BLOCKS[0]
    _blocks.override_blocks({"GEMM_GPU_BLOCKS": {"2": [32, 32, 32, 4]}})  # explicit beats the file
    assert _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 2) == (32, 32, 32, 4)


@pytest.mark.parametrize("entries,needle", [
    ({"NOPE": {}}, "unknown table 'NOPE'"),
    ({"GEMM_GPU_BLOCKS": {"7": [64, 64, 32, 4]}}, "unknown key '7'"),
    ({"GEMM_GPU_BLOCKS": {"2": [64, 64, 32]}}, "GEMM_GPU_BLOCKS[2]: expected ints >= 1 shaped like (128, 128, 64, 8)"),
    ({"COVARIANCE_GPU_BLOCKS": {"wide": [64, 0, 4]}}, "expected ints >= 1"),
    ({"PAIRWISE_GPU_BLOCKS": {"2": [128, 128, 32, 1, 8, 3]}}, "shaped like ((128"),
    ({"PAIR_GPU_BLOCKS": {"0": [64, 64, True]}}, "expected ints >= 1"),
    ({"FP32_TENSOR_CORES": {"gemm": [2]}}, "FP32_TENSOR_CORES[gemm]: expected (0,) or (1,) (off or on), got (2,)"),
    ({"FP32_TENSOR_CORES": {"attention": [1]}}, "unknown key 'attention'"),
    ({"PAIRWISE_MATERIALIZED_TORCH": {"contract": [3]}},
     "PAIRWISE_MATERIALIZED_TORCH[contract]: expected (0,) or (1,) (off or on), got (3,)"),
    ({"PAIRWISE_MATERIALIZED_TORCH": {"score": [1]}}, "unknown key 'score'"),
])
def test_bad_overrides_name_table_key_expected_and_actual(entries, needle):
    with pytest.raises(ValueError) as e:
        _blocks.override_blocks(entries)
    assert needle in str(e.value)


def test_bad_tuning_file(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"rows": []}))
    monkeypatch.setenv("SOURCE_FAST_TRITON_BLOCKS", str(path))
    with pytest.raises(ValueError, match="SOURCE_FAST_TRITON_BLOCKS=.*'best'"):
        _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 2)
    monkeypatch.setenv("SOURCE_FAST_TRITON_BLOCKS", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="expected a readable tuning file"):
        _blocks.gpu_blocks("GEMM_GPU_BLOCKS", 2)


def _tuner():
    spec = importlib.util.spec_from_file_location("tune_triton", BENCH / "tune_triton.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tune_triton", module)  # dataclasses resolve annotations through it
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.interpreter
def test_every_tuning_candidate_computes_the_right_numbers(monkeypatch):
    """Under the interpreter (block shapes are what it checks; warps and stages are GPU-only), each candidate
    tile of each entry is the one the kernel ran with, and matches the torch backend."""
    tuner = _tuner()
    seen = []
    real = _blocks.gpu_blocks
    monkeypatch.setattr(_blocks, "gpu_blocks",
                        lambda table, key: seen.append((table, real(table, key))) or real(table, key))
    result = tuner.tune(tuner.ENTRIES, torch.device("cpu"), smoke=True, budget_s=float("inf"), out=None,
                        log=lambda s: None)
    assert result["failures"] == 0, [r for r in result["rows"] if not r.get("ok")]
    assert len(result["rows"]) == sum(len(e.candidates) + 1 for e in tuner.ENTRIES)  # + the torch baseline
    for entry in tuner.ENTRIES:
        key = entry.key_for(entry.smoke_shape)
        for cand in entry.candidates:
            assert (entry.table, entry.value(cand, key)) in seen, (entry.name, cand)
    assert result["best"] == {}  # the interpreter is never timed, so nothing is chosen
