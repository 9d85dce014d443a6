"""Nothing lost, nothing silently wrong: atomic stores, resume after kill -9, config checks."""
import functools
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import io

from _models import ClassificationTask, classification_data, mlp, train_run

WORKER = Path(__file__).with_name("_resume_worker.py")


def _worker_process(out_dir, result, mode="two_pass"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(out_dir), str(result), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("mode", ["two_pass", "one_pass"])
def test_kill_at_random_points_then_resume_is_bitwise_identical(tmp_path, mode):
    """fit() then scores, or scores alone (one pass per checkpoint, segments stored as they finish)."""
    _worker = functools.partial(_worker_process, mode=mode)
    # An untimed first run: in a fresh checkout it also compiles every module's bytecode, which would make the
    # timed reference slower than the runs it is meant to predict (kills then land after they finish).
    warm = _worker(tmp_path / "warm", tmp_path / "warm.npy")
    assert warm.wait(timeout=300) == 0, warm.stderr.read().decode()[-2000:]
    start = time.perf_counter()
    ref = _worker(tmp_path / "ref", tmp_path / "ref.npy")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    duration = time.perf_counter() - start
    expected = np.load(tmp_path / "ref.npy")
    rng = np.random.default_rng(0)
    interrupted_mid_run = 0
    for trial, fraction in enumerate([0.45, 0.7, 0.9]):
        out = tmp_path / f"run{trial}"
        proc = _worker(out, tmp_path / f"partial{trial}.npy")
        time.sleep(duration * fraction * rng.uniform(0.9, 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "factors").exists() and not (tmp_path / f"partial{trial}.npy").exists():
            interrupted_mid_run += 1
        resumed = _worker(out, tmp_path / f"resumed{trial}.npy")
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
        got = np.load(tmp_path / f"resumed{trial}.npy")
        assert np.array_equal(got, expected), f"trial {trial}: resumed result differs from the uninterrupted run"
    assert interrupted_mid_run >= 1, "no trial was killed mid-run: the test did not exercise resumption"


def _analyzer(out, **kw):
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=3)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    return sf.SourceAnalyzer(model, ClassificationTask(), run, output_dir=out, batch_size=4, score_block=8,
                             progress=False, **kw), data


def test_config_mismatch_refuses_to_mix_results(tmp_path):
    analyzer, data = _analyzer(tmp_path)
    analyzer.pairwise_scores(Subset(data, range(3)), data)
    other, _ = _analyzer(tmp_path, seed=1)  # another label-sampling seed: other factors and scores
    with pytest.raises(io.StoreMismatchError, match="different configuration"):
        other.pairwise_scores(Subset(data, range(3)), data)
    again, _ = _analyzer(tmp_path, seed=1, overwrite=True)
    assert again.pairwise_scores(Subset(data, range(3)), data).shape == (3, 20)


def test_corrupt_score_file_is_reported_and_corrupt_factor_recomputed(tmp_path):
    analyzer, data = _analyzer(tmp_path)
    first = analyzer.pairwise_scores(Subset(data, range(3)), data)
    scores_file = tmp_path / "scores" / "pairwise_source.npy"
    scores_file.write_bytes(scores_file.read_bytes()[:40])  # truncated
    fresh, _ = _analyzer(tmp_path)
    with pytest.raises(io.CorruptStoreError, match="unreadable|shape"):
        fresh.pairwise_scores(Subset(data, range(3)), data)
    # A corrupt segment file sends fit() back to the per-checkpoint factors, where the corrupt one is recomputed.
    for name in ("lambda_ckpt0", "segment_0"):
        (tmp_path / "factors" / f"{name}.safetensors").write_bytes(b"garbage")
    recomputed, _ = _analyzer(tmp_path, overwrite=True)
    assert torch.equal(recomputed.pairwise_scores(Subset(data, range(3)), data), first)


def test_finished_fit_is_loaded_not_recomputed(tmp_path):
    """A second fit() under the same configuration loads every segment's blocks (no pass over the data,
    no eigendecomposition) and scores bitwise the same; another configuration is refused as before."""
    analyzer, data = _analyzer(tmp_path)
    first = analyzer.pairwise_scores(Subset(data, range(3)), data)
    again, _ = _analyzer(tmp_path)
    forwards = []
    handle = again.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        again.fit(data)
    finally:
        handle.remove()
    assert forwards == []
    assert torch.equal(again.pairwise_scores(Subset(data, range(3)), data), first)
    other, _ = _analyzer(tmp_path, seed=1)
    with pytest.raises(io.StoreMismatchError, match="different configuration"):
        other.fit(data)


def test_unfinished_blocks_are_recomputed_not_trusted(tmp_path):
    analyzer, data = _analyzer(tmp_path)
    first = analyzer.pairwise_scores(Subset(data, range(3)), data)
    # A block written but never marked done (a crash between the data flush and the done flush).
    scores = np.load(tmp_path / "scores" / "pairwise_source.npy", mmap_mode="r+")
    done = np.load(tmp_path / "scores" / "pairwise_source.done.npy", mmap_mode="r+")
    scores[:, 8:16] = 12345.0
    done[1] = 0
    scores.flush()
    done.flush()
    del scores, done
    fresh, _ = _analyzer(tmp_path)
    assert torch.equal(fresh.pairwise_scores(Subset(data, range(3)), data), first)


def test_atomic_write_over_a_memory_mapped_file(tmp_path):
    path = tmp_path / "factors.safetensors"
    io.save_tensors(path, {"x": torch.arange(1000.0)}, {"v": 1})
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        old = bytes(mapped[:64])
        io.save_tensors(path, {"x": torch.arange(1000.0) * 2}, {"v": 1})  # replaced, not written in place
        assert bytes(mapped[:64]) == old  # the reader's mapping still sees the old, complete file
        mapped.close()
    tensors, _ = io.load_tensors(path, {"v": 1})
    assert torch.equal(tensors["x"], torch.arange(1000.0) * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(io.StoreMismatchError):
        io.load_tensors(path, {"v": 2})


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        io.atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("d", [1, 2, 7, 130])
def test_stored_factors_pack_the_upper_triangle_row_major_and_unpack_exactly(d, device):
    """The on-disk form of a covariance factor: its upper triangle, row by row (what safetensors files written
    by earlier versions hold), read back to the same symmetric matrix bit for bit (row slices on CPU, one gather
    on a GPU)."""
    from source_fast.analyzer import _pack_symmetric, _unpack_symmetric

    m = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    m = (m + m.T).to(device)
    rows, cols = torch.triu_indices(d, d, device=device)
    packed = _pack_symmetric({"fc.A": m})
    assert list(packed) == ["fc.A_triu"] and torch.equal(packed["fc.A_triu"], m[rows, cols])
    back = _unpack_symmetric(packed)
    assert list(back) == ["fc.A"] and torch.equal(back["fc.A"], m)
