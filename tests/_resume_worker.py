"""Subprocess body for tests/test_resume.py: fit + pairwise + self scores into an output_dir."""
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from source_fast.demo import DigitsTask as Task  # summed cross-entropy, sampled labels


def main(output_dir, result_path, one_pass=False):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=gen)
    y = torch.randint(0, 10, (3000,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 10))
    ckpts = []
    for c in range(6):
        torch.manual_seed(c)
        ckpts.append({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()})
    run = sf.TrainingRun(ckpts, [10, 20, 30, 40, 50, 60], lr=0.05, momentum=0.9, num_segments=3)
    data = TensorDataset(x, y)
    analyzer = sf.SourceAnalyzer(model, Task(), run, output_dir=output_dir, batch_size=50, score_block=250,
                                 deterministic=True, progress=False)
    if not one_pass:
        analyzer.fit(data)
    pairwise = analyzer.pairwise_scores(Subset(data, range(40)), data)  # without fit(): one pass per checkpoint
    self_scores = analyzer.self_scores(Subset(data, range(600)))
    np.save(result_path, np.concatenate([pairwise.numpy().ravel(), self_scores.numpy()]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], one_pass=len(sys.argv) > 3 and sys.argv[3] == "one_pass")
