"""Log-probabilities of selected tokens from vocab-parallel logits, without gathering the vocabulary.

Layout (Megatron's): tensor-parallel rank ``r`` holds logits columns ``[vocab_start, vocab_start + V_local)``
of the padded vocabulary. Columns ``>= vocab_size`` (the true tokenizer vocabulary) are padding: they
get probability zero, are never selected and receive zero gradient.

Every objective in this package reads the student only through

    log p(v)    for a few ids v per row (teacher top-K, the sampled token, the student's top-k), and
    log p(S^c)  the log-mass outside the first ``tail_cols`` ids of the row (the "tail bucket"),

so one custom autograd Function computes both. The tail is summed directly over the complement (with its
own max), never as ``log(1 - sum p)``, which loses all precision when the top-K covers almost all mass.

Memory: the forward keeps only [n, K] outputs and two [n] statistics; the backward recomputes the
softmax chunk by chunk, so beyond the [N, V_local] gradient (in the logits' dtype) the peak extra memory
is one fp32 [chunk_tokens, V_local] working buffer (chunks whose rows are contiguous are read as views;
scattered rows add a gathered copy, and a cast copy in backward, in the logits' dtype). Collectives per
chunk: one MAX all-reduce of [chunk, 2] and one SUM all-reduce of [chunk, K'+2] over ``tp_group``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class VocabShard:
    """Where this rank's logits sit in the vocabulary, and the group that holds the rest."""

    vocab_start: int
    """First global column of this rank's shard."""
    vocab_size: int
    """True tokenizer vocabulary; global columns at or above it are padding."""
    tp_group: dist.ProcessGroup | None = None
    """Tensor-parallel group the vocabulary is split over; None for TP=1."""

    def valid_columns(self, v_local: int) -> int:
        """Number of leading local columns that are real tokens (padding sits at the end)."""
        return max(0, min(v_local, self.vocab_size - self.vocab_start))

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(t, op=op, group=self.tp_group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[tp, *t.shape] (a leading dim of 1 at TP=1)."""
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(out, t.contiguous(), group=self.tp_group)
        return torch.stack(out)


def _owned(ids: torch.Tensor, shard: VocabShard, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of ids in this shard, local column index clamped to 0 where not owned)."""
    local = ids.long() - shard.vocab_start
    owned = (local >= 0) & (local < n_valid)
    return owned, torch.where(owned, local, 0)


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """[n, K] bool: True at the first occurrence of each id within its row (set semantics for S)."""
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.empty_like(first_sorted).scatter_(1, order, first_sorted)


def _forward_chunk(
    t: torch.Tensor, ids: torch.Tensor, tail_cols: int, scale: float, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of rows: (log p at ids [n, K'], lse [n], log tail mass [n]) with global statistics.

    t: [n, n_valid] a fresh fp32 copy of the chunk's real columns (modified in place).
    """
    n_valid = t.shape[1]
    if scale != 1.0:
        t.mul_(scale)
    owned, local = _owned(ids, shard, n_valid)
    sel = torch.where(owned, t.gather(1, local), 0.0) if n_valid else torch.zeros(ids.shape, device=t.device)
    row_max = t.max(dim=1).values if n_valid else torch.full((t.shape[0],), NEG_INF, device=t.device)
    s_owned, s_local = owned[:, :tail_cols], local[:, :tail_cols]
    if tail_cols and n_valid:
        # Hide S from the complement: amin with +inf is a no-op, so unowned ids may all point at column 0.
        hide = torch.where(s_owned, NEG_INF, float("inf"))
        t.scatter_reduce_(1, s_local, hide, reduce="amin")
    comp_max = t.max(dim=1).values if n_valid else row_max.clone()
    maxes = shard.all_reduce(torch.stack([row_max, comp_max], dim=1), dist.ReduceOp.MAX)
    row_max, comp_max = maxes[:, 0], torch.where(torch.isfinite(maxes[:, 1]), maxes[:, 1], 0.0)
    comp_sum = t.sub_(comp_max[:, None]).exp_().sum(dim=1) if n_valid else torch.zeros_like(row_max)
    distinct = owned[:, :tail_cols] & _first_occurrence(ids[:, :tail_cols])
    s_sum = torch.where(distinct, (sel[:, :tail_cols] - row_max[:, None]).exp(), 0.0).sum(dim=1)
    sums = shard.all_reduce(torch.cat([sel, s_sum[:, None], comp_sum[:, None]], dim=1), dist.ReduceOp.SUM)
    sel, s_sum, comp_sum = sums[:, :-2], sums[:, -2], sums[:, -1]
    total = s_sum + comp_sum * (comp_max - row_max).exp()
    lse = row_max + total.log()
    return sel - lse[:, None], lse, comp_max + comp_sum.log() - lse


def _backward_chunk(
    t: torch.Tensor, ids: torch.Tensor, tail_cols: int, scale: float, shard: VocabShard,
    lse: torch.Tensor, log_tail: torch.Tensor, g_sel: torch.Tensor, g_tail: torch.Tensor,
) -> torch.Tensor:
    """d loss / d chunk over the valid columns, fp32 [n, n_valid], computed in place in ``t`` (see above).

    d log p(v)/d l_u = 1[u=v] - p_u;  d log p(S^c)/d l_u = 1[u not in S] p_u / p(S^c) - p_u.  With
    c = sum_j g_sel_j + g_tail that is, per column u:
        u not in S:  p_u/p(S^c) * (g_tail - c p(S^c))        (dense; the exponent is <= 0, no overflow)
        u in S:      -c p_u                                   (sparse, [n, K])
    plus g_sel_j scattered at each id j.
    """
    n_valid = t.shape[1]
    if n_valid == 0:
        return t
    if scale != 1.0:
        t.mul_(scale)
    owned, local = _owned(ids, shard, n_valid)
    c = g_sel.sum(dim=1) + torch.where(torch.isfinite(log_tail), g_tail, 0.0)
    if tail_cols:
        shift = torch.where(torch.isfinite(log_tail), log_tail, 0.0)
        dense = torch.where(torch.isfinite(log_tail), g_tail - c * log_tail.exp(), -c)
        s_owned, s_local = owned[:, :tail_cols], local[:, :tail_cols]
        s_logp = t.gather(1, s_local) - lse[:, None]
        t.scatter_reduce_(1, s_local, torch.where(s_owned, NEG_INF, float("inf")), reduce="amin")
    else:
        shift, dense = torch.zeros_like(lse), -c
    t.sub_((lse + shift)[:, None]).clamp_(max=0.0).exp_().mul_(dense[:, None])
    if tail_cols:
        first = s_owned & _first_occurrence(ids[:, :tail_cols])
        t.scatter_add_(1, s_local, torch.where(first, -c[:, None] * s_logp.exp(), 0.0))
    t.scatter_add_(1, local, torch.where(owned, g_sel, 0.0))
    return t.mul_(scale) if scale != 1.0 else t


def _chunks(rows: torch.Tensor, chunk_tokens: int) -> list[tuple[int, int, int | None]]:
    """(a, b, first_row) per chunk of ``rows``; first_row is set when rows[a:b] is a contiguous range,
    so the chunk can be a view of the logits instead of a gathered copy."""
    bounds = rows.tolist() if rows.numel() else []
    out = []
    for a in range(0, len(bounds), chunk_tokens):
        b = min(len(bounds), a + chunk_tokens)
        contiguous = bounds[a:b] == list(range(bounds[a], bounds[a] + b - a))
        out.append((a, b, bounds[a] if contiguous else None))
    return out


def _working_copy(logits: torch.Tensor, rows: torch.Tensor, a: int, b: int, first: int | None,
                  shard: VocabShard) -> torch.Tensor:
    """A fresh fp32 [b - a, n_valid] copy of the chunk's real columns: the one fp32 buffer per chunk."""
    n_valid = shard.valid_columns(logits.shape[1])
    if first is not None:
        return logits[first:first + b - a, :n_valid].to(torch.float32, copy=True)
    return logits[rows[a:b], :n_valid].float()  # advanced indexing already copies


class _SelectLogprobs(torch.autograd.Function):
    """Chunked vocab-parallel (log p at ids, log tail mass); backward recomputes the softmax per chunk."""

    @staticmethod
    def forward(ctx, logits, rows, ids, tail_cols, scale, shard, chunk_tokens):  # noqa: D401
        # Flatten inside, so the gradient comes back in the caller's shape: autograd would clone a gradient
        # that arrives through a view before storing it in a leaf's .grad (one more [N, V_local] copy).
        flat = logits.reshape(-1, logits.shape[-1])
        n = rows.shape[0]
        out_sel = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
        out_lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        out_tail = torch.empty(n, dtype=torch.float32, device=logits.device)
        chunks = _chunks(rows, chunk_tokens)
        for a, b, first in chunks:
            work = _working_copy(flat, rows, a, b, first, shard)
            sel, lse, tail = _forward_chunk(work, ids[a:b], tail_cols, scale, shard)
            out_sel[a:b], out_lse[a:b], out_tail[a:b] = sel, lse, tail
            del work  # free this chunk's buffer before the next one is allocated
        ctx.save_for_backward(logits, rows, ids, out_lse, out_tail)
        ctx.args = (tail_cols, scale, shard, chunks)
        ctx.mark_non_differentiable(out_lse)
        return out_sel, out_tail, out_lse

    @staticmethod
    def backward(ctx, g_sel, g_tail, _g_lse):
        logits, rows, ids, lse, log_tail = ctx.saved_tensors
        tail_cols, scale, shard, chunks = ctx.args
        g_sel = torch.zeros_like(ids, dtype=torch.float32) if g_sel is None else g_sel.float()
        g_tail = torch.zeros_like(lse) if g_tail is None else g_tail.float()
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)  # padding, other rows: 0
        flat = logits.reshape(-1, logits.shape[-1])
        grad_flat = grad.view(-1, grad.shape[-1])
        for a, b, first in chunks:
            g = _backward_chunk(_working_copy(flat, rows, a, b, first, shard), ids[a:b], tail_cols, scale, shard,
                                lse[a:b], log_tail[a:b], g_sel[a:b], g_tail[a:b])
            if first is not None:
                grad_flat[first:first + b - a, : g.shape[1]].copy_(g)  # casts in place, no second buffer
            else:
                grad_flat[rows[a:b], : g.shape[1]] = g.to(grad.dtype)
            del g  # free this chunk's buffer before the next one is allocated
        return grad, None, None, None, None, None, None


@dataclass(frozen=True, slots=True)
class Selection:
    """Student (or in-trainer teacher) log-probabilities at chosen ids, for n rows."""

    logp: torch.Tensor
    """[n, K'] fp32 log p(ids); differentiable w.r.t. the logits."""
    log_tail: torch.Tensor
    """[n] fp32 log of the mass outside the first ``tail_cols`` ids of each row (-inf if none)."""
    lse: torch.Tensor
    """[n] fp32 log-partition over the true vocabulary (no gradient; for diagnostics)."""


def select_logprobs(
    logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, shard: VocabShard, *,
    tail_cols: int = 0, temperature: float = 1.0, chunk_tokens: int = 1024,
) -> Selection:
    """Log-probabilities of ``softmax(logits / temperature)`` at global ``ids`` for the given rows.

    logits: [..., V_local] this rank's vocabulary slice (any float dtype; never upcast beyond one chunk);
            the leading dims are flattened to N rows.
    rows:   [n] int64 distinct, ascending row indices into the N rows (e.g. the valid response tokens).
    ids:    [n, K'] global token ids in ``[0, vocab_size)``, identical on every TP rank.
    tail_cols: the first ``tail_cols`` columns of ``ids`` define the set S whose complement is the tail.
    Every TP rank must call this with the same rows/ids (it runs collectives on ``shard.tp_group``).
    """
    if ids.dim() != 2 or ids.shape[0] != rows.shape[0]:
        raise ValueError(f"select_logprobs: logits {tuple(logits.shape)}, rows {tuple(rows.shape)}, "
                         f"ids {tuple(ids.shape)} do not fit [..., V_local], [n], [n, K]")
    sel, tail, lse = _SelectLogprobs.apply(logits, rows.long(), ids.long(), tail_cols, 1.0 / temperature,
                                           shard, max(1, chunk_tokens))
    return Selection(logp=sel, log_tail=tail, lse=lse)


@torch.no_grad()
def global_topk_ids(
    logits: torch.Tensor, rows: torch.Tensor, k: int, shard: VocabShard, *, chunk_tokens: int = 1024
) -> torch.Tensor:
    """[n, k] int64 global ids of the k largest logits of each row over the TRUE vocabulary (all TP ranks).

    Padding columns are never chosen; k is capped at ``vocab_size``. Ties resolve to the lower id.
    """
    k = min(k, shard.vocab_size)
    logits = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=logits.device)
    for a in range(0, rows.shape[0], chunk_tokens):
        b = min(rows.shape[0], a + chunk_tokens)
        chunk = logits[rows[a:b]]
        n_valid = shard.valid_columns(chunk.shape[1])
        kk = min(k, n_valid)
        vals, idx = chunk[:, :n_valid].float().topk(kk, dim=1)
        pad = k - kk  # a rank with fewer real columns than k pads with -inf candidates
        vals = torch.cat([vals, vals.new_full((b - a, pad), NEG_INF)], dim=1)
        idx = torch.cat([idx + shard.vocab_start, idx.new_full((b - a, pad), shard.vocab_size)], dim=1)
        all_vals = shard.all_gather(vals).permute(1, 0, 2).reshape(b - a, -1)
        all_idx = shard.all_gather(idx).permute(1, 0, 2).reshape(b - a, -1)
        # Sort by (value desc, id asc) so every rank picks the same ids on ties.
        order = torch.argsort(all_idx, dim=1, stable=True)
        all_vals, all_idx = all_vals.gather(1, order), all_idx.gather(1, order)
        best = torch.argsort(all_vals, dim=1, descending=True, stable=True)[:, :k]
        out[a:b] = all_idx.gather(1, best)
    return out
