"""Score a batch of rollouts with the routed teachers (DESIGN.md §1 steps 3-4).

Each teacher is called once per batch with all the rollouts routed to it; the answers are put back
in packing order: rollout 0's response tokens, then rollout 1's, ... (``N = sum T``), which is the
order ``Routing.index`` and ``build_train_batches`` use.

One K per batch: every teacher is asked for the same ``top_k`` and must return exactly that many
entries (``Teacher.score`` refuses anything else). Padding a smaller K with ``-inf`` logprobs would
put ``0 * -inf`` terms into every objective, and truncating a larger one is the teacher's
business (ask it for fewer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mopd.errors import TeacherError
from mopd.teachers.base import Teacher
from mopd.teachers.router import Router, logprob_dtype, routed_label
from mopd.types import Prompt, Rollout, Routing, TeacherScores


def score_batch(
    rollouts: Sequence[Rollout],
    teachers: Sequence[Teacher],
    router: Router,
    top_k: int,
    prompts: Mapping[int, Prompt] | None = None,
) -> tuple[Routing, TeacherScores]:
    """Route and score ``rollouts``.

    Returns the Routing (``index`` [N], ``weights`` [N, M] for mixtures) and the supervising scores
    at each packed response token: ``topk_ids`` [N, K] int32, ``topk_logprobs`` [N, K],
    ``sampled_logprob`` [N], ``tail_logmass`` [N]; ``teacher`` is a label naming all teachers.
    ``prompts`` (by ``prompt_index``) is only needed for metadata routing rules. The decision is
    recorded on ``router.last`` / ``router.totals``.
    """
    if not rollouts:
        raise TeacherError("score_batch: no rollouts to score")
    names = tuple(t.name for t in teachers)
    if names != router.teachers:
        raise TeacherError(f"score_batch: teachers {list(names)} are not the router's teachers {list(router.teachers)}")
    lengths = [int(r.response_ids.numel()) for r in rollouts]
    if router.per_token:
        per_teacher = {m: TeacherScores.concat(teachers[m].score(rollouts, top_k)) for m in router.candidates()}
        routing, scores = router.route_tokens(per_teacher)
    else:
        per_rollout = router.route_prompts(rollouts, prompts)
        scores = _gather_by_teacher(rollouts, teachers, per_rollout, top_k, routed_label(names))
        routing = router.expand(per_rollout, lengths)
    router.record(routing, lengths)
    return routing, scores


def _gather_by_teacher(
    rollouts: Sequence[Rollout], teachers: Sequence[Teacher], per_rollout: Sequence[int], top_k: int, label: str
) -> TeacherScores:
    """One ``score`` call per routed teacher, rows reassembled in packing order."""
    parts: list[TeacherScores | None] = [None] * len(rollouts)
    for m in sorted(set(per_rollout)):
        group = [b for b, t in enumerate(per_rollout) if t == m]
        for b, s in zip(group, teachers[m].score([rollouts[b] for b in group], top_k)):
            parts[b] = s
    ready = [p for p in parts if p is not None]
    assert len(ready) == len(rollouts)
    dtype = logprob_dtype(ready)
    return TeacherScores(
        topk_ids=torch.cat([p.topk_ids for p in ready]),
        topk_logprobs=torch.cat([p.topk_logprobs.to(dtype) for p in ready]),
        sampled_logprob=torch.cat([p.sampled_logprob for p in ready]),
        tail_logmass=torch.cat([p.tail_logmass for p in ready]),
        teacher=label,
    )

