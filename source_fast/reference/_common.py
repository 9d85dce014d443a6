import torch


def compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else x.dtype
