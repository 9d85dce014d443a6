"""TrainingRun: segmentation, learning-rate mass, stages, checkpoint loading."""
import pytest
import torch

import source_fast as sf


def _ckpts(n):
    return [{"w": torch.full((2,), float(i))} for i in range(n)]


def test_default_segments_group_checkpoints_evenly_and_sum_the_schedule():
    lrs = [0.1 * (k + 1) for k in range(60)]
    run = sf.TrainingRun(_ckpts(6), [10, 20, 30, 40, 50, 60], lr=lrs, num_segments=3)
    assert [(s.start, s.end, s.checkpoints) for s in run.segments] == [(0, 20, (0, 1)), (20, 40, (2, 3)),
                                                                      (40, 60, (4, 5))]
    assert run.segments[1].lr_mass == pytest.approx(sum(lrs[20:40]))
    assert sum(s.lr_mass for s in run.segments) == pytest.approx(sum(lrs))


def test_momentum_divides_the_mass_and_callable_lr_works():
    run = sf.TrainingRun(_ckpts(2), [5, 10], lr=lambda k: 0.01 * (k + 1), momentum=0.9, num_segments=2)
    assert run.segments[0].lr_mass == pytest.approx(0.15)
    assert run.segments[0].c == pytest.approx(1.5)


def test_explicit_boundaries_and_uneven_groups():
    run = sf.TrainingRun(_ckpts(5), [1, 2, 3, 4, 5], lr=1.0, num_segments=[1, 4])
    assert [s.checkpoints for s in run.segments] == [(0,), (1, 2, 3), (4,)]
    run = sf.TrainingRun(_ckpts(5), [1, 2, 3, 4, 5], lr=1.0, num_segments=2)
    assert [len(s.checkpoints) for s in run.segments] == [3, 2]


def test_stages_align_segments_and_count_examples():
    run = sf.TrainingRun(_ckpts(6), [10, 20, 30, 40, 50, 60], lr=0.1, num_segments=3, stage_boundaries=[40],
                         example_stages=[0, 0, 0, 1, 1])
    assert all(s.end <= 40 or s.start >= 40 for s in run.segments)
    assert [s.stage for s in run.segments] == [0, 0, 1]
    assert run.stage_sizes(5) == [3, 2]
    with pytest.raises(ValueError, match="must include every stage boundary"):
        sf.TrainingRun(_ckpts(6), [10, 20, 30, 40, 50, 60], lr=0.1, num_segments=[30], stage_boundaries=[40],
                       example_stages=[0, 1])
    with pytest.raises(ValueError, match="must be >= the number of stages"):
        sf.TrainingRun(_ckpts(6), [10, 20, 30, 40, 50, 60], lr=0.1, num_segments=1, stage_boundaries=[40],
                       example_stages=[0, 1])


def test_checkpoints_from_files_and_parameter_average(tmp_path):
    paths = []
    for i, state in enumerate(_ckpts(3)):
        path = tmp_path / f"c{i}.pt"
        torch.save(state, path)
        paths.append(str(path))
    run = sf.TrainingRun(paths, [1, 2, 3], lr=0.1, num_segments=1)
    assert torch.equal(run.load_checkpoint(2)["w"], torch.full((2,), 2.0))
    assert torch.equal(run.averaged_state([0, 1, 2])["w"], torch.full((2,), 1.0))
    assert "segment 0" in run.describe()
