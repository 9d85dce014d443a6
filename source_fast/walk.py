"""The SOURCE query walk (SOURCE_MATH.md §2), on precomputed EK-FAC blocks.

For a query direction u_L (per layer, [Q, O, I]) and segments ℓ = L..1:
    v_ℓ = r_ℓ(H̄_ℓ) u_ℓ        (accumulation: what segment ℓ's gradients are scored against)
    u_{ℓ−1} = s_ℓ(H̄_ℓ) u_ℓ    (propagation to earlier segments)
Both come from one rotation per segment and layer (ops.kron_project with two spectral functions).

Adam variant (§4, an approximation): with p̄ the segment-averaged preconditioner and
E = exp(−c p̄ ⊙ diag H̄) elementwise in parameter space,
    v_ℓ = (H̄ + δ I)⁻¹ ((1 − E) ⊙ u_ℓ),   u_{ℓ−1} = E ⊙ u_ℓ.
With weight decay (per parameter wd): E = exp(−c p̄ ⊙ (diag H̄ + wd)) for Adam (L2 in the gradient) and
exp(−c (p̄ ⊙ diag H̄ + wd)) for AdamW (decoupled), and the inverse is of H̄ + diag(wd) (Adam) or H̄ + diag(wd / p̄)
(AdamW), that diagonal projected on the eigenbasis (`EKFACBlock.eigen_diagonal`). SGD segments take weight decay
in their blocks' Λ (the analyzer's `_decayed`).

A segment's operators are one (r, s) pair for every layer, or a mapping layer -> pair (layers trained at their own
learning rate: `TrainingRun(lr_scale=...)`).
"""
from __future__ import annotations

from typing import Container, Mapping, Sequence

import torch

from . import _compiled, _extension, _linalg, ops, spectral
from .ekfac import EKFACBlock

LayerTensors = dict[str, torch.Tensor]
Operators = "tuple[spectral.Spectral, spectral.Spectral] | Mapping[str, tuple[spectral.Spectral, spectral.Spectral]]"


def layer_operators(operators, name: str) -> tuple[spectral.Spectral, spectral.Spectral]:
    """(r, s) of layer `name` from a segment's operators (one pair for all layers, or one per layer)."""
    return operators[name] if isinstance(operators, Mapping) else operators


def query_walk(u: LayerTensors, blocks: Sequence[dict[str, EKFACBlock]], operators: Sequence[Operators], *,
               adam: Sequence[dict[str, torch.Tensor] | None] | None = None,
               adam_damping: Sequence[dict[str, float]] | None = None,
               adam_decay: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
               backend: str | None = None) -> list[LayerTensors]:
    """Walk u back through segments (given in training order). Returns v_ℓ per segment, training order.

    Args:
        u: per layer, query directions ``[Q, O, I]`` at the final model.
        blocks: per segment, per layer EK-FAC block.
        operators: per segment, (r, s) spectral functions (or a mapping layer -> (r, s)).
        adam: per segment, per layer p̄ ``[O, I]`` (None for SGD segments).
        adam_damping: per segment, per layer δ of the Adam accumulation inverse.
        adam_decay: weight decay of Adam segments, per segment and layer: (its rate in the exponent, added to
            p̄ ⊙ diag H̄, in parameter space [O, I]; its shift of the inverse's Λ, in the eigenbasis [O, I]).
    """
    if not (len(blocks) == len(operators)):
        raise ValueError(f"blocks and operators must have one entry per segment, got {len(blocks)} and "
                         f"{len(operators)}")
    current = dict(u)
    out: list[LayerTensors] = [dict() for _ in blocks]
    for seg in reversed(range(len(blocks))):
        p_bar = adam[seg] if adam is not None else None
        for name, direction in current.items():
            block = blocks[seg][name]
            r, s = layer_operators(operators[seg], name)
            if p_bar is None:
                v, nxt = ops.kron_project(direction, block.q_s, block.q_a, block.lam, (r, s), backend=backend)
            else:
                rate = p_bar[name].to(direction.dtype) * block.diagonal().clamp_min(0).to(direction.dtype)
                lam = block.lam
                if adam_decay is not None:
                    rate = rate + adam_decay[seg][name][0].to(direction.dtype)
                    lam = lam + adam_decay[seg][name][1].to(lam.dtype)
                decay = torch.exp(-s.c * rate)
                damping = adam_damping[seg][name]
                v = ops.kron_project((1 - decay) * direction, block.q_s, block.q_a, lam,
                                     spectral.inverse(damping), backend=backend)
                nxt = decay * direction
            out[seg][name] = v
            current[name] = nxt.to(direction.dtype)
    return out


def rotate_in(v: torch.Tensor, block: EKFACBlock, out: torch.Tensor | None = None) -> torch.Tensor:
    """Q_Sᵀ V Q_A for a batch V [Q, O, I] (query directions, or formed per-example gradients): one large GEMM (batch
    folded into the rows), one batched; into `out` when given."""
    return _two_sided(v, block.q_s.T, block.q_a, out=out)


def _two_sided(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """left · X_q · right for a batch X [Q, O, I] (into `out` when given)."""
    return _linalg.matmul(left.to(x.dtype), _linalg.matmul(x, right.to(x.dtype)), out=out)


_IN_PLACE_CHUNK_BYTES = 32 << 20  # scratch of one chunk of queries: stays a reused heap block, not a fresh mmap


def _two_sided_(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """left · X_q · right written over X (contiguous [Q, O, I]), a chunk of queries at a time.

    Why: the walk's directions are its largest tensors; two fresh [Q, O, I] results per segment
    boundary cost their first-touch page faults (on the benchmark host about a third of the products'
    time) and peak memory. Here only one chunk-sized scratch buffer is used (`scratch` [chunk, O, I],
    to reuse one across calls)."""
    if not x.is_contiguous() or left.shape[0] != left.shape[1] or right.shape[0] != right.shape[1]:
        return _two_sided(x, left, right)
    left, right = left.to(x.dtype), right.to(x.dtype)
    q = x.shape[0]
    if scratch is None:
        scratch = torch.empty(_two_sided_chunk(x), *x.shape[1:], dtype=x.dtype, device=x.device)
    chunk = scratch.shape[0]
    for q0 in range(0, q, chunk):
        part = x[q0:q0 + chunk]
        tmp = _linalg.matmul(part, right, out=scratch[:part.shape[0]])
        _linalg.matmul(left, tmp, out=part)
    return x


def _two_sided_chunk(x: torch.Tensor) -> int:
    """Queries per chunk of `_two_sided_` for a batch shaped like x [Q, O, I]."""
    q, o, i = x.shape
    return max(1, min(q, _IN_PLACE_CHUNK_BYTES // max(1, o * i * x.element_size())))


def change_basis(x: torch.Tensor, src: EKFACBlock, dst: EKFACBlock) -> torch.Tensor:
    """A batch X [Q, O, I] given in src's eigenbasis, expressed in dst's: (Q_S'ᵀ Q_S) X (Q_Aᵀ Q_A')."""
    return _two_sided(x, dst.q_s.T @ src.q_s, src.q_a.T @ dst.q_a)


class WalkPlan:
    """What a rotated walk needs per segment and layer, computed once and reused by every batch:
    r(Λ_ℓ) and s(Λ_ℓ) in the walk dtype, and the cross-basis matrices to the previous segment."""

    def __init__(self, blocks: Sequence[dict[str, EKFACBlock]], operators: Sequence[Operators], dtype: torch.dtype):
        self.num_segments = len(blocks)
        self.r: list[dict[str, torch.Tensor]] = []
        self.s: list[dict[str, torch.Tensor]] = []
        self.to_previous: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for seg, pairs in enumerate(operators):
            lam = {name: b.lam.to(dtype) for name, b in blocks[seg].items()}
            self.r.append({name: spectral.evaluate(layer_operators(pairs, name)[0], x) for name, x in lam.items()})
            self.s.append({name: spectral.evaluate(layer_operators(pairs, name)[1], x) for name, x in lam.items()})
            self.to_previous.append({} if seg == 0 else {
                name: _cross_basis(b, blocks[seg - 1][name], dtype) for name, b in blocks[seg].items()})


def _cross_basis(src: EKFACBlock, dst: EKFACBlock, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) that take a direction from src's eigenbasis to dst's: left · X · right."""
    return (dst.q_s.T @ src.q_s).to(dtype), (src.q_a.T @ dst.q_a).to(dtype)


def _accumulation_term(current: torch.Tensor, r: torch.Tensor, *, queries_innermost: bool, last_use: bool,
                       reuse: torch.Tensor | None = None) -> torch.Tensor:
    """W = r(Λ) ⊙ ũ: into a zero-padded queries-innermost buffer when asked (`reuse`, such a view of ũ's
    shape that is no longer needed, if given), else over ũ at its last use, else a new tensor."""
    if queries_innermost:
        compiled = _compiled_writes_ok(current, r)  # csrc/to_queries_innermost zeroes the padding itself
        if reuse is not None and reuse.shape == current.shape and reuse.dtype == current.dtype \
                and reuse.device == current.device and _extension.is_queries_innermost(reuse):
            w = reuse if compiled else _extension.zero_query_padding(reuse)
        elif compiled:
            w = None
        else:
            w = _extension.queries_innermost_empty(*current.shape, dtype=current.dtype, device=current.device)
        if compiled:
            return _extension.to_queries_innermost_cpu(current, r, out=w)
        return torch.mul(current, r, out=w)
    return current.mul_(r) if last_use else r * current


_COMPILED_MIN_ELEMENTS = 1 << 16  # below this a parallel region costs more than the layout saves


def _compiled_writes_ok(current: torch.Tensor, r: torch.Tensor) -> bool:
    """Whether csrc/to_queries_innermost writes W = r ⊙ ũ: each query's [O, I] contiguous, r a contiguous
    [O, I], enough elements, and `_compiled.usable`. (torch.mul into that layout reads ũ a page per element:
    ≈ 5× slower for 200 × 512 × 785 on a 2-core Zen 4 host; the same bits.)"""
    q, o, i = current.shape
    if current.numel() < _COMPILED_MIN_ELEMENTS or tuple(r.shape) != (o, i) or not r.is_contiguous() \
            or current.stride(2) != 1 or current.stride(1) != i:
        return False
    return _compiled.usable("queries-innermost writes", _check_writes, current, r)


def _check_writes() -> bool:
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(19, 5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    got = _extension.to_queries_innermost_cpu(x, r)
    return torch.equal(got, x * r) and not bool(_extension.query_padding(got).any())


def rotated_walk(u_rot: LayerTensors, blocks: Sequence[dict[str, EKFACBlock]], operators: Sequence[Operators], *,
                 plan: WalkPlan | None = None, consume: bool = False,
                 queries_innermost: Container[tuple[int, str]] = ()) -> list[LayerTensors]:
    """The query walk without leaving the eigenbases (SGD segments).

    u_rot: per layer, the query directions already rotated into the *last* segment's basis.
    Returns per segment (training order) W_ℓ = r_ℓ(Λ_ℓ) ⊙ ũ_ℓ in segment ℓ's basis, so that
    ⟨v_ℓ, G⟩ = ⟨W_ℓ, Q_Sᵀ G Q_A⟩: scoring against training rows rotated by that basis (cheap:
    a Q_A and g Q_S) replaces rotating every v_ℓ back. ũ moves between bases with one cross-basis
    product per boundary, so a walk over L segments costs L − 1 two-sided products, not 3L.
    `plan`: a `WalkPlan` of these blocks and operators, to reuse across batches.
    `consume`: u_rot's tensors may be overwritten (the caller no longer needs them): two fewer
    allocations of the largest tensors per layer (the first damping and the last W, done in place).
    `queries_innermost`: (segment, layer) pairs whose W is written as a view of a zero-padded
    [O, I, Qs] buffer (`_extension.queries_innermost_empty`), the layout the output-side rotation and
    the CPU sparse kernel work on in place.
    """
    if plan is None:
        plan = WalkPlan(blocks, operators, next(iter(u_rot.values())).dtype)
    out: list[LayerTensors] = [dict() for _ in blocks]
    for name, current in u_rot.items():
        owned = consume  # else the caller's tensor is never modified in place
        for seg in reversed(range(len(blocks))):
            out[seg][name] = _accumulation_term(current, plan.r[seg][name],
                                                queries_innermost=(seg, name) in queries_innermost,
                                                last_use=seg == 0 and owned)
            if seg > 0:
                damped = current.mul_(plan.s[seg][name]) if owned else plan.s[seg][name] * current
                current = _two_sided_(damped, *plan.to_previous[seg][name])
                owned = True
    return out


class SegmentByStepWalk:
    """`rotated_walk` one segment at a time, last to first, each step needing only the blocks of the
    segment it reaches: for a run that fits segment ℓ just before scoring it (the one-pass SOURCE
    schedule), so no W_ℓ of another segment is held meanwhile. Same products in the same order as
    `rotated_walk`, so the same W_ℓ bit for bit.

    u_rot: per layer, the query directions rotated into the last segment's basis; consumed.
    A caller done with a step's W hands it back (`recycle`): the next step writes into those buffers, so
    a walk over L segments allocates (and first-touches) one W per layer, not L."""

    def __init__(self, u_rot: LayerTensors, dtype: torch.dtype):
        self.current, self.dtype = dict(u_rot), dtype
        self._above: tuple[dict[str, EKFACBlock], dict[str, torch.Tensor]] | None = None
        self._next_segment: int | None = None
        self._spare: LayerTensors = {}  # W buffers handed back by `recycle`
        self._scratch: LayerTensors = {}  # the cross-basis products' chunk buffers, one per layer

    def recycle(self, w: Mapping[str, object]) -> None:
        """Hand back W tensors of an earlier step that nothing uses any more (views sharing their storage
        included, e.g. the output-side product written over W): queries-innermost ones are reused."""
        for name, x in w.items():
            if isinstance(x, torch.Tensor) and _extension.is_queries_innermost(x):
                self._spare[name] = x

    def step(self, seg: int, blocks: dict[str, EKFACBlock], operators: Operators, *,
             queries_innermost: Container[str] = ()) -> LayerTensors:
        """W_seg per layer (segments must come L−1, L−2, …, 0); layers in queries_innermost get W as a view
        of a zero-padded [O, I, Qs] buffer, as in `rotated_walk`."""
        if self._next_segment is not None and seg != self._next_segment:
            raise ValueError(f"segments must be walked last to first: expected segment {self._next_segment}, got {seg}")
        out: LayerTensors = {}
        for name, current in self.current.items():
            if self._above is not None:  # bring ũ from the segment above into this one's basis
                above, s_above = self._above
                scratch = workspace_buffer(self._scratch, name, (_two_sided_chunk(current), *current.shape[1:]),
                                           dtype=current.dtype, device=current.device)
                current = self.current[name] = _two_sided_(current.mul_(s_above[name]),
                                                           *_cross_basis(above[name], blocks[name], self.dtype),
                                                           scratch=scratch)
            r = layer_operators(operators, name)[0]
            out[name] = _accumulation_term(current, spectral.evaluate(r, blocks[name].lam.to(self.dtype)),
                                           queries_innermost=name in queries_innermost, last_use=seg == 0,
                                           reuse=self._spare.pop(name, None))
        self._above = (blocks, {name: spectral.evaluate(layer_operators(operators, name)[1], b.lam.to(self.dtype))
                                for name, b in blocks.items() if name in self.current})
        self._next_segment = seg - 1
        return out


def rotated_walk_visit(u_rot: LayerTensors, plan: WalkPlan, visit, *,
                       workspace: dict[str, torch.Tensor] | None = None) -> None:
    """`rotated_walk` without keeping its results: for each layer and segment ℓ = L..1, calls
    visit(ℓ, layer, W_ℓ) with W_ℓ = r_ℓ(Λ_ℓ) ⊙ ũ_ℓ in a buffer that the next visit overwrites.

    u_rot is consumed (overwritten). Callers that score each W_ℓ at once (self-influence, one batch of
    training examples at a time) hold two [Q, O, I] tensors per layer instead of L + 1, and with a
    `workspace` dict kept across batches they allocate none after the first batch (fresh buffers of
    this size cost their page faults on every batch)."""
    workspace = {} if workspace is None else workspace
    for name, current in u_rot.items():
        kw = dict(dtype=current.dtype, device=current.device)
        w = workspace_buffer(workspace, f"w:{name}", tuple(current.shape), **kw)
        scratch = workspace_buffer(workspace, f"scratch:{name}", (_two_sided_chunk(current), *current.shape[1:]), **kw)
        for seg in reversed(range(plan.num_segments)):
            visit(seg, name, torch.mul(current, plan.r[seg][name], out=w))
            if seg > 0:
                _two_sided_(current.mul_(plan.s[seg][name]), *plan.to_previous[seg][name], scratch=scratch)


def workspace_buffer(workspace: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], *,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous [shape[0], ...] buffer from workspace[key], reallocated only when it does not fit
    (a later, smaller batch gets a leading slice)."""
    buf = workspace.get(key)
    if buf is None or tuple(buf.shape[1:]) != tuple(shape[1:]) or buf.dtype != dtype or buf.device != device \
            or buf.shape[0] < shape[0]:
        buf = workspace[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf[:shape[0]]
