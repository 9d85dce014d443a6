"""Dense float64 oracle of the whole SOURCE pipeline, for tests on tiny models.

It shares no code path with the production pipeline beyond the Task protocol and `TrainingRun`'s
segmentation: it takes every per-example gradient one example at a time with autograd on the
parameters, builds every segment's EK-FAC matrix densely (flat parameter space, block diagonal
over layers), forms exp(−cH̄) and (I − exp(−cH̄))H̄⁻¹ by dense eigendecomposition and evaluates

    τ(z_q, z_m) = Σ_ℓ (1/N_ℓ) ∇f(z_q)ᵀ S_L ··· S_{ℓ+1} R_ℓ ḡ_ℓ(z_m)

as explicit matrix products (each layer's functions with its own c_ℓ under `TrainingRun.lr_scale`), with
H̄_ℓ + diag(wd) when the run has weight decay (each parameter its own decay,
the bias column included: exact where the pipeline shares a layer's weight decay with its bias column).
Gradients are taken in eval mode, as the pipeline takes them (dropout off, BatchNorm on each checkpoint's running
statistics). Empirical Fisher only (true labels), so no sampling enters. Tokens that
the task's attention mask marks 0 leave the activation covariance, the pipeline's convention.
Cost is O(P³) in the number of tracked parameters P: keep P ≲ 2000.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import default_collate

from .conv_patch_rows import conv_patches_one


def _layers(model, names=None):
    """(name, module, group, groups) per tracked layer: a grouped convolution is one entry per group, "<name>[k]"
    (its own block of the block-diagonal curvature)."""
    mods = dict(model.named_modules())
    if names is None:
        names = [n for n, m in mods.items() if n and (isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or
                                                     type(m).__name__ == "Conv1D")]
    entries = []
    for n in names:
        m = mods[n]
        groups = m.groups if isinstance(m, (nn.Conv1d, nn.Conv2d)) else 1
        entries += [(n, m, 0, 1)] if groups == 1 else [(f"{n}[{k}]", m, k, groups) for k in range(groups)]
    return entries


def _as_matrix(module, weight, bias, group=0, groups=1):
    w = weight.T if type(module).__name__ == "Conv1D" else weight
    w = w.reshape(w.shape[0], -1)
    rows = slice(group * (w.shape[0] // groups), (group + 1) * (w.shape[0] // groups))
    w, bias = w[rows], None if bias is None else bias[rows]
    return torch.cat([w, bias[:, None]], 1) if bias is not None else w


def _weight_decays(run, layers) -> torch.Tensor:
    """Every tracked parameter's weight decay, flattened as the per-example gradients are."""
    out = []
    for name, m, k, groups in layers:
        module = name.split("[")[0]
        weight = torch.full(m.weight.shape, run.parameter_weight_decay(f"{module}.weight"), dtype=torch.float64)
        bias = None if m.bias is None else torch.full(m.bias.shape, run.parameter_weight_decay(f"{module}.bias"),
                                                      dtype=torch.float64)
        out.append(_as_matrix(m, weight, bias, k, groups).reshape(-1))
    return torch.cat(out)


def _example_terms(model, task, example, layers, kind):
    """One example: per layer (G [O, I], a rows [T, I], g rows [T, O]) for the task's loss or measurement.
    A module called several times in the forward (shared weights) has every call's rows, in call order (those
    whose output reaches the loss)."""
    batch = default_collate([example])
    acts, outs = {}, {}
    hooks = {}
    for _, m, _, _ in layers:
        if id(m) in hooks:
            continue

        def hook(mod, inp, out, key=id(m)):
            acts.setdefault(key, []).append(inp[0].detach())
            outs.setdefault(key, []).append(out)
            out.retain_grad()
        hooks[id(m)] = m.register_forward_hook(hook)
    model.zero_grad(set_to_none=True)
    value = task.compute_measurement(batch, model) if kind == "measurement" else \
        task.compute_train_loss(batch, model, sample=False)
    value.backward()
    for h in hooks.values():
        h.remove()
    get_mask = getattr(task, "get_attention_mask", None)
    mask = get_mask(batch) if callable(get_mask) else None
    result = {}
    for name, m, k, groups in layers:
        G = _as_matrix(m, m.weight.grad, m.bias.grad if m.bias is not None else None, k, groups).double()
        pairs = list(zip(acts[id(m)], outs[id(m)]))
        # A call whose output the loss does not reach (used detached) is no part of the gradient: dropped, unless
        # no call reaches it (then zero gradient rows).
        reached = [(x, out) for x, out in pairs if out.grad is not None] or \
            [(x, out.detach().requires_grad_()) for x, out in pairs]
        for _, out in reached:
            if out.grad is None:
                out.grad = torch.zeros_like(out)
        calls = [_call_rows(m, x.double(), out, k, groups, mask) for x, out in reached]
        result[name] = (G, torch.cat([a for a, _ in calls]), torch.cat([g for _, g in calls]))
    return result


def _truncated(directions: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    """Flat directions [Q, P] with each layer's [O, I] block of every query replaced by its rank-`rank` SVD."""
    out, offset = [], 0
    for o, i in sizes:
        block = directions[:, offset:offset + o * i].reshape(-1, o, i)
        if rank < min(o, i):
            u, sv, vh = torch.linalg.svd(block, full_matrices=False)
            block = (u[:, :, :rank] * sv[:, None, :rank]) @ vh[:, :rank]
        out.append(block.reshape(block.shape[0], -1))
        offset += o * i
    return torch.cat(out, 1)


def _per_position(terms: dict, layers) -> torch.Tensor:
    """One example's per-position gradients [T, P]: row t is g_t a_tᵀ of every layer, flattened as G is."""
    tokens = {name: terms[name][1].shape[0] for name, *_ in layers}
    assert len(set(tokens.values())) == 1, f"per-token scores need one T for every layer, got {tokens}"
    return torch.cat([(terms[name][2][:, :, None] * terms[name][1][:, None, :]).flatten(1) for name, *_ in layers], 1)


def _call_rows(m, x, out, k, groups, mask):
    """(a rows [T, I], g rows [T, O]) of one call of module m (group k of `groups`) for one example."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        c, o = x.shape[1] // groups, out.shape[1] // groups
        a = conv_patches_one(m, x[:, k * c:(k + 1) * c])
        g = out.grad.double()[0, k * o:(k + 1) * o].reshape(o, -1).T
    else:
        a = x.reshape(-1, x.shape[-1])
        g = out.grad.double().reshape(-1, out.shape[-1])
    if m.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    if mask is not None and mask.shape == (1, a.shape[0]) and not isinstance(m, nn.Conv2d):
        a = a * mask[0, :, None].to(a.dtype)  # masked tokens leave the activation covariance
    return a, g


def _sym_eigh(m):
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return w.clamp_min(0), v


def dense_source_scores(model: nn.Module, task, run, query_dataset, train_dataset, *, method: str = "source",
                        damping: float = 0.0, module_names=None, per_token: bool = False,
                        query_rank: int | None = None) -> torch.Tensor:
    """Float64 scores [n_query, n_train] for method "source" or "influence" (damped inverse, > 0). per_token: each
    training token position's share, [n_query, n_train, T], from the per-position gradients g_t a_tᵀ of the
    hooked rows (every layer must have the same T; asserted to sum to autograd's per-example gradient). query_rank:
    each query's direction per layer and segment replaced by its rank-R truncated SVD (layers with min(O, I) ≤ R
    exact), as `SourceAnalyzer(query_rank=R)` scores."""
    model = model.double()
    layers = _layers(model, module_names)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()

    def load(i):
        model.load_state_dict({k: v.double() if v.is_floating_point() else v
                               for k, v in run.load_checkpoint(i).items()})

    n_train = len(train_dataset)
    final = len(run.checkpoints) - 1
    seg_list = run.segments if method == "source" else [None]
    seg_ckpts = [s.checkpoints for s in run.segments] if method == "source" else [(final,)]
    stages = run.example_stages
    stage_sizes = run.stage_sizes(n_train)

    # Per checkpoint: per-example training gradients, flattened over layers: [N, P].
    per_ckpt, per_token_ckpt = {}, {}
    covs = {}
    for seg, members in enumerate(seg_ckpts):
        stage = seg_list[seg].stage if method == "source" else 0
        in_stage = [stages is None or method != "source" or int(stages[n]) == stage for n in range(n_train)]
        for i in members:
            load(i)
            flats, token_flats, A, S = [], [], {}, {}
            for n in range(n_train):
                terms = _example_terms(model, task, train_dataset[n], layers, "loss")
                flats.append(torch.cat([terms[name][0].reshape(-1) for name, *_ in layers]))
                if per_token:
                    token_flats.append(_per_position(terms, layers))
                    assert torch.allclose(token_flats[-1].sum(0), flats[-1], rtol=1e-10, atol=1e-12)
                if not in_stage[n]:
                    continue
                for name, *_ in layers:
                    _, a, g = terms[name]
                    A[name] = A.get(name, 0) + a.T @ a
                    S[name] = S.get(name, 0) + g.T @ g
            per_ckpt[i] = torch.stack(flats)
            if per_token:
                tokens = max(t.shape[0] for t in token_flats)
                per_token_ckpt[i] = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, tokens - t.shape[0]))
                                                 for t in token_flats])  # [N, T, P]
            count = sum(in_stage)
            covs[i] = ({k: v / count for k, v in A.items()}, {k: v / count for k, v in S.items()})
    load(final)
    queries = torch.stack([torch.cat([t[0].reshape(-1) for t in
                                      _example_terms(model, task, query_dataset[q], layers, "measurement").values()])
                           for q in range(len(query_dataset))])
    model.load_state_dict(saved)
    model.train(was_training)

    # Dense segment curvature H̄_ℓ, block diagonal over layers.
    sizes = [(_as_matrix(m, m.weight, m.bias, k, groups).shape) for _, m, k, groups in layers]
    hessians = []
    for seg, members in enumerate(seg_ckpts):
        stage = seg_list[seg].stage if method == "source" else 0
        keep = torch.ones(n_train, dtype=torch.bool) if stages is None or method != "source" else stages == stage
        blocks, offset = [], 0
        for (name, *_), (o, i) in zip(layers, sizes):
            A = sum(covs[c][0][name] for c in members) / len(members)
            S = sum(covs[c][1][name] for c in members) / len(members)
            _, qa = _sym_eigh(A)
            _, qs = _sym_eigh(S)
            basis = torch.kron(qs, qa)
            lam = 0
            for c in members:
                grads = per_ckpt[c][keep][:, offset:offset + o * i]
                lam = lam + ((grads @ basis) ** 2).mean(0)
            lam = run.loss_scale * lam / len(members)
            blocks.append(basis @ torch.diag(lam) @ basis.T)
            offset += o * i
        decays, offset = _weight_decays(run, layers), 0
        for k, (o, i) in enumerate(sizes):  # SOURCE: each layer's block with its parameters' decay on the diagonal
            if method == "source":
                blocks[k] = blocks[k] + torch.diag(decays[offset:offset + o * i])
            offset += o * i
        hessians.append(blocks)

    def matfun(h, fn):
        w, v = _sym_eigh(h)
        return v @ torch.diag(fn(w)) @ v.T

    # Each layer's rate relative to the run's (TrainingRun.lr_scale): its blocks' functions take ratio × c.
    scales = [run.parameter_lr_scale(f"{name.split('[')[0]}.weight") for name, *_ in layers]

    def blockwise(seg, fn):  # fn(w, c_scale): the block-diagonal matrix of fn on each layer's block
        return torch.block_diag(*[matfun(h, lambda w, k=k: fn(w, scales[k])) for k, h in enumerate(hessians[seg])])

    def train_side(i):  # training gradients [N, P], or per token [N, P, T]
        return per_token_ckpt[i].transpose(1, 2) if per_token else per_ckpt[i]

    def contract(left, g):  # directions left [Q, P] with g [N, P] or [N, P, T]: [Q, N] or [Q, N, T]
        if query_rank is not None:
            left = _truncated(left, sizes, query_rank)
        return left @ g.T if g.dim() == 2 else torch.einsum("qp,npt->qnt", left, g)

    if method == "influence":
        inv = matfun(torch.block_diag(*hessians[0]), lambda w: 1.0 / (w + damping))
        return contract(queries @ inv, run.loss_scale * train_side(final)) / n_train

    scores = 0
    propagate = torch.eye(queries.shape[1], dtype=torch.float64)  # S_L ··· S_{ℓ+1}
    for seg in reversed(range(len(seg_list))):
        c = seg_list[seg].c

        def r_fn(w, scale, c=c):
            x = scale * c * w
            return torch.where(x < 1e-12, torch.full_like(w, scale * c), -torch.expm1(-x) / torch.where(w > 0, w, 1.0))

        R = blockwise(seg, r_fn)
        g_bar = run.loss_scale * sum(train_side(i) for i in seg_ckpts[seg]) / len(seg_ckpts[seg])
        stage = seg_list[seg].stage
        mask = torch.ones(n_train, dtype=torch.float64) if stages is None else (stages == stage).double()
        part = contract(queries @ propagate @ R, g_bar)
        scores = scores + part * mask.reshape(-1, *[1] * (part.dim() - 2)) / stage_sizes[stage]
        propagate = propagate @ blockwise(seg, lambda w, scale, c=c: torch.exp(-scale * c * w))
    return scores
