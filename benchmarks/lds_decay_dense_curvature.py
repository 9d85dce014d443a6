"""Why does modelling weight decay lower the LDS of the digits MLP (benchmarks/results/lds_cpu.md, "Weight decay")?
Dense curvatures at the attributed model of a *_decay task of `lds_reproduction.py`, against the same ground truths.

For the model's P parameters (4,810 for the 64-64-10 MLP) it forms, in float64:
- the exact Hessian of the mean training loss (torch.func.hessian), and its spectrum with and without the decay;
- the exact Gauss-Newton matrix Jᵀ(diag p − p pᵀ)J / N (PSD: it leaves out the loss's negative curvature);
and scores influence (1/N) ∇f_qᵀ (M + D)⁻¹ ∇L_m with each M, D the decay (weights only, as trained) or the damping
1/Σηₖ, then the LDS of each against the ground truths `lds_reproduction.py` cached (same masks, seeds, queries).
For a one-layer model (the logistic tasks) also EK-FAC's form with exact eigenvalues: the GGN's diagonal in the
Kronecker eigenbasis of its expected factors (A = E[a aᵀ], S = E[diag p − p pᵀ]), the decay projected on it, which
separates what the Kronecker basis costs from what sampling the eigenvalue correction costs.

    python benchmarks/lds_decay_dense_curvature.py digits_decay_converged   # after lds_reproduction.py (cache)
    python benchmarks/lds_decay_dense_curvature.py digits_decay --quick     # tiny sizes: computes its own truths

Prints a table; writes nothing (an analysis script: its numbers are quoted in lds_cpu.md's notes).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
F64 = torch.float64


def _lds_module():
    if "lds_reproduction" in sys.modules:
        return sys.modules["lds_reproduction"]
    spec = importlib.util.spec_from_file_location("lds_reproduction", HERE / "lds_reproduction.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lds_reproduction"] = module  # retraining workers unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    lds = _lds_module()
    from source_fast import evaluation

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("task", help="a *_decay task of lds_reproduction.py")
    p.add_argument("--quick", action="store_true", help="the quick specs, M = 8, S = 2 (own ground truth)")
    p.add_argument("--cache-dir", default=str(HERE.parent / ".lds_cache"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    spec = lds.make_specs(args.quick)[args.task]
    if not spec.weight_decay:
        raise SystemExit(f"{args.task} trains without weight decay: choose one of {lds.DECAY_TASKS}")
    m, s = (8, 2) if args.quick else (100, 8)
    data = lds.build_data(spec)
    params, _, _, lrs, _, _ = lds.attributed_run(spec, data)
    masks = evaluation.draw_subset_masks(len(data.x), m, alpha=0.5, seed=1)
    truth = {pr: lds.ground_truth(spec, masks, pr, s, Path(args.cache_dir), args.workers, False)[0]
             for pr in lds.PROTOCOLS}

    shapes = [t.shape for pair in params for t in pair]
    theta = torch.cat([t.to(F64).reshape(-1) for pair in params for t in pair])
    x, y, xq, yq = data.x.to(F64), data.y, data.xq.to(F64), data.yq

    def logits(v, inputs):
        h, i = inputs, 0
        for j in range(len(shapes) // 2):
            w = v[i:i + shapes[2 * j].numel()].reshape(shapes[2 * j])
            i += shapes[2 * j].numel()
            b = v[i:i + shapes[2 * j + 1].numel()]
            i += shapes[2 * j + 1].numel()
            h = h @ w.T + b
            if j < len(shapes) // 2 - 1:
                h = h.clamp_min(0)
        return h

    n = len(x)
    hessian = torch.func.hessian(lambda v: F.cross_entropy(logits(v, x), y))(theta)
    jac = torch.func.vmap(torch.func.jacrev(lambda v, xi: logits(v, xi[None])[0]), in_dims=(None, 0))(theta, x)
    probs = torch.softmax(logits(theta, x), 1)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :], jac) / n
    decay = torch.cat([torch.full((sh.numel(),), spec.weight_decay if len(sh) == 2 else 0.0, dtype=F64)
                       for sh in shapes])
    damping = torch.full_like(decay, 1.0 / sum(lrs))

    def eig_min(mat):
        return float(torch.linalg.eigvalsh(mat).min())

    h_eigs = torch.linalg.eigvalsh(hessian)
    print(f"{args.task}: P = {theta.numel()}; Hessian: min eigenvalue {float(h_eigs.min()):.3g}, "
          f"{int((h_eigs < -1e-4).sum())} below -1e-4; Hessian + decay: min {eig_min(hessian + torch.diag(decay)):.3g};"
          f" GGN: min {eig_min(ggn):.3g}")
    grad = torch.func.vmap(torch.func.grad(lambda v, xi, yi: F.cross_entropy(logits(v, xi[None]), yi[None])),
                           in_dims=(None, 0, 0))
    train_grads, query_grads = grad(theta, x, y), grad(theta, xq, yq)
    print("| curvature | same epochs | same steps |\n|---|---|---|")
    for label, mat, shift in [("GGN + decay", ggn, decay), ("GGN + 1/Σηₖ", ggn, damping),
                              ("Hessian + decay", hessian, decay)]:
        w, v = torch.linalg.eigh(mat + torch.diag(shift))
        scores = (((query_grads @ v) / w) @ (v.T @ train_grads.T) / n).numpy()
        values = [evaluation.lds(scores, masks, truth[pr], n_bootstrap=200)["mean"] for pr in lds.PROTOCOLS]
        print(f"| {label} | {values[0]:+.3f} | {values[1]:+.3f} |", flush=True)
    if len(shapes) == 2:  # one layer: [C, I] with the bias last, as source_fast lays it out
        inputs = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
        factor_a = inputs.T @ inputs / n
        factor_s = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(0)
        basis = torch.kron(torch.linalg.eigh(factor_s)[1], torch.linalg.eigh(factor_a)[1])
        # source_fast's [O, I] row-major order is theta's weight-then-bias order permuted: map through it
        out_dim, in_dim = shapes[0]
        order = torch.tensor([o * in_dim + i if i < in_dim else out_dim * in_dim + o
                              for o in range(out_dim) for i in range(in_dim + 1)])
        ggn_oi = ggn[order][:, order]
        lam = torch.diagonal(basis.T @ ggn_oi @ basis)
        for label, shift in [("EK-FAC form, exact Λ, + decay (projected)",
                              torch.diagonal(basis.T @ torch.diag(decay[order]) @ basis)),
                             ("EK-FAC form, exact Λ, + 1/Σηₖ", 1.0 / sum(lrs))]:
            scores = ((((query_grads[:, order] @ basis) / (lam + shift)) @ basis.T) @ train_grads[:, order].T / n)
            values = [evaluation.lds(scores.numpy(), masks, truth[pr], n_bootstrap=200)["mean"]
                      for pr in lds.PROTOCOLS]
            print(f"| {label} | {values[0]:+.3f} | {values[1]:+.3f} |", flush=True)
    print(f"SMOKE {args.task}" if args.quick else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
