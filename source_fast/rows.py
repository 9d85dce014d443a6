"""Token rows {layer: (a [B, T, I], g [B, T, O])} between the passes that make them and the ops that use
them: a byte-budgeted cache of whole batches (kept from a covariance pass for the eigen-correction, and for
scoring in the one-pass schedule; a conv layer kept as its module input, `Rebuilt`, or as its per-example
gradients, `Formed`, whichever is smaller), and the stacking of a segment's checkpoints along tokens and of
consecutive batches along examples for the scoring kernels."""
from __future__ import annotations

import torch

from . import _linalg
from .modules import Rebuilt, one_channel_group_grads


def compact_rows(rows: dict, sources: dict) -> dict:
    """rows {layer: (a, g)} with the a of each layer in `sources` ({layer: (make, source, module)}, see
    `modules.Capture.sources`) kept as `Rebuilt(make, source, module)` where the source is the smaller."""
    out = {}
    for name, (a, g) in rows.items():
        source = sources.get(name)
        out[name] = (Rebuilt(*source) if source is not None and source[1].numel() < a.numel() else a, g)
    return out


def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat(parts, dim), as a view where the parts are consecutive equal slices along dim of one tensor (the
    groups of a module read consecutive channels of its input and write consecutive channels of its output):
    no copy, whatever the layout (in channels-last the cat was a strided gather, 0.4 of a 3.1 s depthwise fit)."""
    if len(parts) == 1:
        return parts[0]
    first, step = parts[0], _even_step(parts)
    size = first.shape[dim]
    # a size-1 dim's stride is arbitrary (a reshape may set it to anything): the parts' step is then its stride
    if step is None or (size > 1 and step != size * first.stride(dim)):
        return torch.cat(parts, dim=dim)
    shape, stride = list(first.shape), list(first.stride())
    shape[dim] *= len(parts)
    if size == 1:
        stride[dim] = step
    return first.as_strided(shape, stride, first.storage_offset())


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(parts), as a view where the parts are equal views of one tensor at evenly spaced offsets."""
    if len(parts) == 1:
        return parts[0].unsqueeze(0)
    step = _even_step(parts)
    if step is None:
        return torch.stack(parts)
    first = parts[0]
    return first.as_strided((len(parts), *first.shape), (step, *first.stride()), first.storage_offset())


def _even_step(parts: list[torch.Tensor]) -> int | None:
    """The storage offset step between consecutive parts (two or more) if they are views of one storage with one
    shape, strides, dtype and device at offsets first + k·step (step > 0), else None."""
    first = parts[0]
    step = parts[1].storage_offset() - first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    for k, part in enumerate(parts):
        if (part.shape != first.shape or part.stride() != first.stride() or part.dtype != first.dtype
                or part.device != first.device or part.storage_offset() != first.storage_offset() + k * step
                or part.untyped_storage().data_ptr() != ptr):
            return None
    return step if step > 0 else None


def one_channel_families(rows: dict) -> list[tuple[object, list[str], torch.Tensor]]:
    """The layers whose a is a `Rebuilt` of one input channel (a depthwise convolution's groups), by module:
    (module, their names in layer order, their input channels side by side [B, groups, *spatial])."""
    families: dict[int, list[str]] = {}
    for name, (a, _) in rows.items():
        if isinstance(a, Rebuilt) and a.module is not None:
            families.setdefault(id(a.module), []).append(name)
    out = []
    for names in families.values():
        sources = [rows[name][0] for name in names]
        x = joined([a.source for a in sources], dim=1)
        out.append((sources[0].module, names, x))
    return out


def expanded_rows(rows: dict, gradient_form: bool = False) -> dict:
    """`kept_rows`' inverse: every Rebuilt a made into its rows again; with gradient_form (for uses of the rows
    through G_n only, which take `Formed` layers as they are), those of one input channel into `Formed` per-example
    gradients instead, one `one_channel_group_grads` call for all the groups of a module."""
    formed = {}
    for module, names, x in one_channel_families(rows) if gradient_form else ():
        grads = _family_grads(module, names, x, rows)
        formed.update((name, (Formed(grads[:, k]), None)) for k, name in enumerate(names))
    out = {}
    for name, (a, g) in rows.items():
        if name in formed:
            out[name] = formed[name]
        elif isinstance(a, Formed):
            if not gradient_form:
                raise ValueError(f"layer {name!r} was kept as its per-example gradients (rows.Formed): they have "
                                 "no token rows, only uses through G_n (gradient_form=True) can take them")
            out[name] = (a, g)
        else:
            out[name] = (a.rows() if isinstance(a, Rebuilt) else a, g)
    return out


def _family_grads(module, names: list[str], x: torch.Tensor, rows: dict) -> torch.Tensor:
    """`one_channel_group_grads` [B, groups, m, k² (+1)] of one module's groups `names` (in `rows`, whose a are
    `Rebuilt` of their input channels, x those channels side by side)."""
    gy = joined([rows[name][1].transpose(1, 2) for name in names], dim=1)  # [B, channels·m, positions]
    return one_channel_group_grads(module, x, gy)


class Formed:
    """A layer's per-example gradients G_n = Σ_t g_t a_tᵀ [B, O, I] in place of its token rows (a rows entry
    `(Formed(G), None)`), where every later use of them goes through G_n and they take at most half the bytes
    (`formed_layers`): a conv layer's positions. A row cache keeps them so (e.g. a 3×3 conv 16→32 at 16×16: 32·145
    values per example instead of its input, 16·256, and output gradients, 256·32; a depthwise group 10 instead of
    2·H·W): more batches fit SOURCE_FAST_ROW_CACHE_MIB, each saving a forward and backward pass. Their users: the
    eigen-correction (`analyzer.LambdaSum`: Σ_n (Q_Sᵀ G_n Q_A)²) and scoring (one GEMM against the directions;
    `merge_rows` sums a segment's checkpoints). shape: G's, [B, O, I]."""

    __slots__ = ("grads",)

    def __init__(self, grads: torch.Tensor):
        self.grads = grads

    @property
    def shape(self) -> torch.Size:
        return self.grads.shape

    @property
    def nbytes(self) -> int:
        return self.grads.numel() * self.grads.element_size()


def _a_width(a) -> int:
    """I of a layer's rows: a's last size, or for a `Rebuilt` of one input channel its kernel (+ bias) width."""
    if isinstance(a, Rebuilt):
        return a.module.weight[0].numel() + int(getattr(a.module, "bias", None) is not None)
    return a.shape[-1]


def _grads_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.promote_types(g.dtype, torch.float32)  # G_n summed over positions: fp32 accumulation or wider


def formed_layers(rows: dict, sources: dict) -> set[str]:
    """The layers of one batch's rows {layer: (a, g)} (a a tensor or a `Rebuilt` of one input channel, sources as
    for `compact_rows`) that a row cache keeps as `Formed`: the groups of one input channel (a depthwise
    convolution's: every later use takes their G_n anyway, `Capture.rows` gradient_form), and CPU rows whose G_n
    take at most half the bytes of their compact rows (for rows kept whole: T ≥ 2·O·I / (I + O) tokens, so G_n read
    back costs less than forming it). Not on GPU (unmeasured there: its kernels take token rows as they come)."""
    out = set()
    for name, (a, g) in rows.items():
        if g.device.type != "cpu" or g.dim() != 3 or (a.module is None if isinstance(a, Rebuilt) else a.dim() != 3):
            continue
        if isinstance(a, Rebuilt):
            out.add(name)
            continue
        b, _, o = g.shape
        grads_bytes = b * o * _a_width(a) * _grads_dtype(g).itemsize
        if 2 * grads_bytes <= _compact_nbytes(a, sources.get(name)) + _nbytes(g):
            out.add(name)
    return out


def _compact_nbytes(a, source) -> int:
    """Bytes `compact_rows` keeps of a layer's a: its source where that is smaller."""
    if isinstance(a, Rebuilt):
        return a.nbytes
    if source is not None and source[1].numel() < a.numel():
        return source[1].numel() * source[1].element_size()
    return _nbytes(a)


def kept_nbytes(rows: dict, sources: dict, formed: set[str], *, shared_a: bool = False) -> int:
    """Bytes of `kept_rows(rows, sources, formed)`, from shapes (before forming anything). shared_a: without the
    a of layers kept as rows (held already by another cache entry: a pass's true-label rows share the sampled
    rows' a)."""
    total = 0
    for name, (a, g) in rows.items():
        if name in formed:
            total += g.shape[0] * g.shape[2] * _a_width(a) * _grads_dtype(g).itemsize
        else:
            total += _nbytes(g) + (0 if shared_a else _compact_nbytes(a, sources.get(name)))
    return total


def kept_rows(rows: dict, sources: dict, formed: set[str]) -> dict:
    """What a row cache keeps of one batch's rows: `compact_rows`, but the layers in `formed` as `Formed` per-example
    gradients: a depthwise convolution's groups by one `one_channel_group_grads` call per module, other layers by
    one batched product of their rows."""
    out = compact_rows({name: pair for name, pair in rows.items() if name not in formed}, sources)
    family_rows = {name: pair for name, pair in rows.items() if name in formed and isinstance(pair[0], Rebuilt)}
    for module, names, x in one_channel_families(family_rows):
        grads = _family_grads(module, names, x, family_rows)
        out.update((name, (Formed(grads[:, k]), None)) for k, name in enumerate(names))
    for name in formed:
        if name not in out:
            out[name] = (Formed(_formed_grads(*rows[name])), None)
    return {name: out[name] for name in rows}  # in the layers' order


def with_formed_gradients(rows: dict, sources: dict, gradient_form: set[str], *, convs: bool = True) -> dict:
    """Rows of a pass that uses them through G_n only (`Capture.rows` gradient_form; `gradient_form` the layers it
    gave as `gradient_rows` of their G_n) as a row cache keeps them: those layers' G_n and, with `convs`, the G_n of
    the layers `formed_layers` picks (the same product as `kept_rows`) as `Formed`. The eigen-correction of a batch
    is then bitwise the same whether a row cache kept it or a pass recomputed it."""
    formed = formed_layers(rows, sources) if convs else set()
    out = {}
    for name, (a, g) in rows.items():
        if name in gradient_form:
            out[name] = (Formed(a), None)  # a: G_n [B, m, I] (g the identity)
        elif name in formed:
            out[name] = (Formed(_formed_grads(a, g)), None)
        else:
            out[name] = (a, g)
    return out


def _formed_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_n = Σ_t g aᵀ [B, O, I] (a transposed view where formed as G_nᵀ), by the product measured fastest for a conv
    layer's rows (128 images, 2 threads, host C, against torch's batched gᵀa): I ≥ 64 the compiled GEMM (1.26–1.64×
    at I = 65–145), else torch's aᵀg (1.15–1.25× at I = 28–33 with 256–1,024 positions). In the small CNN's one pass
    (cProfile) this took 0.73 → 0.69 s: the rows there come fresh from the passes, less cache-warm than measured."""
    dt = _grads_dtype(g)
    a, g = a.to(dt), g.to(dt)
    if a.shape[-1] >= 64:
        return _linalg.matmul(g.transpose(1, 2), a)
    return torch.matmul(a.transpose(1, 2), g).transpose(1, 2)


def _nbytes(t) -> int:
    if t is None:  # the g of a `Formed` layer
        return 0
    return t.nbytes if isinstance(t, (Rebuilt, Formed)) else t.numel() * t.element_size()


def rows_nbytes(rows) -> int:
    """Bytes of token rows {layer: (a, g)}, a and g tensors (or `Rebuilt`) or lists of them."""
    return sum(_nbytes(t) for pair in rows.values() for x in pair for t in (x if isinstance(x, list) else [x]))


def member_lists(per_member: list[dict]) -> dict:
    """[{layer: (a, g)} per member of one batch] -> {layer: ([a per member], [g per member])}."""
    return {name: ([rows[name][0] for rows in per_member], [rows[name][1] for rows in per_member])
            for name in per_member[0]}


# Stacking a layer's rows pays where what it saves outweighs the elements it copies, Σ_k T_k·(I + O) per example:
# the contractions, max(members - 1, 1)·Q·O·I multiply-adds per example (one per extra member; for one member,
# merged batches' better reuse of the query tiles), at this many multiply-adds per copied element, and the calls,
# each worth STACK_CALL_ELEMENTS copied elements (≈ 30 µs of fixed cost per score_pairwise call, ≈ 1.6 ns per
# element copied into a fresh stack). Measured on host B (2 threads, score_pairwise's cpu backend): at ratios of
# contractions to copies of 0.5 and 5 (a small CNN's conv layers, 512 examples of 2 members: 4.6x and 1.9x faster
# unstacked; its SOURCE pairwise stage 4.1-4.5 -> 3.6-3.7 s); 500 (a one-token linear layer: 1.8x faster stacked);
# 23-37 (the Bergson workload's GPT-2 layers, 35 tokens: its one-pass run 5 % slower unstacked, 3 alternating pairs).
STACK_MIN_MACS_PER_COPIED = 16
STACK_CALL_ELEMENTS = 16384


def stacking_pays(q: int, o: int, i: int, tokens: list[int], examples: int, pieces: int) -> bool:
    """Whether `merge_rows` should stack `pieces` (batches × members) of a layer, `examples` in all with these token
    counts per member, for Q directions of O × I instead of scoring each piece on its own."""
    copied = examples * sum(tokens) * (i + o)
    saved = examples * max(len(tokens) - 1, 1) * q * o * i / STACK_MIN_MACS_PER_COPIED
    return copied <= saved + STACK_CALL_ELEMENTS * (pieces - 1)


class Pieces(list):
    """A layer's rows left unstacked: [(first column, a, g)] per batch and member, each scored by its own call and
    added (⟨V, Σ_k G^(k)⟩ = Σ_k ⟨V, G^(k)⟩), where copying them into one stack would cost more than the extra
    contractions (`stacking_pays`: a conv layer's hundreds of positions per example)."""


def merge_rows(items, budget: int, stacks=None):
    """Turn (offset, size, {layer: ([a per member], [g per member])}) items into scoring calls: each
    layer's members stacked along tokens, and consecutive batches with the same token counts merged along
    examples up to `budget` bytes (the scoring kernels run ~15-20 % faster on 512+ examples per call than
    on one batch: their packed query tiles are reused across more columns). Every stacked row is copied once.
    stacks(layer, token counts per member, examples, pieces) -> False leaves that layer's rows as `Pieces`
    instead (None: stack every layer)."""
    pending, used = [], 0

    def token_counts(rows):
        return [tuple(x.shape[1] for x in a) for a, _ in rows.values()]

    def merged():
        if len(pending) == 1 and all(len(a) == 1 for a, _ in pending[0][2].values()):
            return pending[0][0], pending[0][1], {n: (a[0], g[0]) for n, (a, g) in pending[0][2].items()}
        rows, examples = {}, sum(item[1] for item in pending)
        for name, (first_a, _) in pending[0][2].items():
            if isinstance(first_a[0], Formed):  # the members' G_n summed, batches one after another
                rows[name] = (Formed(_summed_formed([item[2][name][0] for item in pending])), None)
                continue
            tokens = [x.shape[1] for x in first_a]
            if stacks is None or stacks(name, tokens, examples, len(pending) * len(tokens)):
                rows[name] = tuple(stack_grid([item[2][name][side] for item in pending]) for side in (0, 1))
                continue
            rows[name], col = Pieces(), 0
            for _, size, item_rows in pending:
                rows[name].extend((col, a, g) for a, g in zip(*item_rows[name]))
                col += size
        return pending[0][0], examples, rows

    for item in items:
        nbytes = rows_nbytes(item[2])
        fits = (pending and used + nbytes <= budget and item[0] == pending[-1][0] + pending[-1][1]
                and token_counts(item[2]) == token_counts(pending[0][2]))
        if pending and not fits:
            yield merged()
            pending, used = [], 0
        pending.append(item)
        used += nbytes
    if pending:
        yield merged()


def _summed_formed(grid: list[list[Formed]]) -> torch.Tensor:
    """grid[batch][member] of `Formed` [n_b, O, I] -> [Σ n_b, O, I], each batch's members summed (Σ_k G_n^(k))."""
    first = grid[0][0].grads
    out = first.new_empty(sum(row[0].shape[0] for row in grid), *first.shape[1:])
    r = 0
    for row in grid:
        block = out[r:r + row[0].shape[0]]
        block.copy_(row[0].grads)
        for x in row[1:]:
            block.add_(x.grads)
        r += block.shape[0]
    return out


def stack_grid(grid: list[list[torch.Tensor]]) -> torch.Tensor:
    """grid[batch][member] of [n_b, T_k, D] -> one [Σ n_b, Σ T_k, D] tensor (members along tokens)."""
    first = grid[0][0]
    out = first.new_empty(sum(row[0].shape[0] for row in grid), sum(x.shape[1] for x in grid[0]), first.shape[2])
    r = 0
    for row in grid:
        c = 0
        for x in row:
            out[r:r + x.shape[0], c:c + x.shape[1]] = x
            c += x.shape[1]
        r += row[0].shape[0]
    return out


class RowBudget:
    """Bytes of kept token rows allowed (SOURCE_FAST_ROW_CACHE_MIB), shared by the caches of a segment.
    per_unit: also at most that many bytes per unit (the one-pass schedule scores the batches kept for
    every member of a segment, so the first member must not take the whole budget)."""

    def __init__(self, limit: int, per_unit: int | None = None):
        self.limit, self.used, self.per_unit = limit, 0, per_unit
        self._by_unit: dict[str, int] = {}

    def take(self, uid: str, nbytes: int) -> bool:
        unit = self._by_unit.get(uid, 0)
        if self.used + nbytes > self.limit or (self.per_unit is not None and unit + nbytes > self.per_unit):
            return False
        self.used += nbytes
        self._by_unit[uid] = unit + nbytes
        return True

    def release(self, uid: str, nbytes: int) -> None:
        self.used -= nbytes
        self._by_unit[uid] = self._by_unit.get(uid, 0) - nbytes


class RowCache:
    """Token rows of a unit's covariance pass kept for a later use (its eigen-correction pass; scoring in
    the one-pass schedule) within a byte budget shared by a segment's caches: a prefix of whole batches
    per unit, the rest of a pass recomputed from that batch on."""

    def __init__(self, budget: RowBudget):
        self.budget = budget
        self._held: dict[str, int] = {}  # bytes this cache charged to the budget, per unit
        self._rows: dict[str, list] = {}
        self._closed: set[str] = set()  # units whose prefix ended (a later batch did not fit)

    def offer(self, uid: str, size: int, rows, nbytes: int | None = None) -> bool:
        """Keep the batch if it fits; nbytes: what it adds to memory (default: all its tensors). rows: a dict, or
        a function making it (called only when the batch fits; nbytes is then required)."""
        if uid in self._closed:
            return False
        if nbytes is None:
            if callable(rows):
                raise ValueError("RowCache.offer: nbytes is required when rows is a function")
            nbytes = rows_nbytes(rows)
        if not self.budget.take(uid, nbytes):
            self._closed.add(uid)
            return False
        if callable(rows):
            rows = rows()
        self._held[uid] = self._held.get(uid, 0) + nbytes
        self._rows.setdefault(uid, []).append((size, rows))
        return True

    def common_prefix(self, uids) -> int:
        """Batches kept for every one of the units (0 for a unit whose pass kept none or did not run)."""
        return min(len(self._rows.get(uid, ())) for uid in uids)

    def take(self, uid: str, gradient_form: bool = False):
        """Yield the unit's cached batches (size, rows) in order, rows rebuilt (`expanded_rows`, with
        `gradient_form` for uses through G_n only), releasing each once used."""
        entries = self._rows.pop(uid, [])
        entries.reverse()
        while entries:
            size, rows = entries.pop()
            yield size, expanded_rows(rows, gradient_form)

    def clear(self) -> None:
        self._rows.clear()
        self._closed.clear()
        for uid, nbytes in self._held.items():
            self.budget.release(uid, nbytes)
        self._held.clear()
