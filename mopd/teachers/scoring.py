"""Score a batch of rollouts with the routed teachers (DESIGN.md §1 steps 3-4).

Each teacher is called once per batch with all the rollouts routed to it; the answers are put back
in packing order: rollout 0's response tokens, then rollout 1's, ... (``N = sum T``), which is the
order ``Routing.index`` and ``build_train_batches`` use.

One K per batch: every teacher is asked for the same ``top_k`` (by default the teachers' common
``TeacherConfig.top_k``) and must return exactly that many entries (``Teacher.score`` refuses
anything else). Padding a smaller K with ``-inf`` logprobs would put ``0 * -inf`` terms into every
objective; asking everyone for one K costs nothing.

``concurrent=True`` sends the teachers' requests from one thread each, so that remote (SGLang)
teachers score at the same time; leave it off for in-process teachers sharing a few CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from mopd.errors import TeacherError
from mopd.teachers.base import Teacher
from mopd.teachers.cross import CrossTokenizerTeacher
from mopd.teachers.router import Router, logprob_dtype, routed_label
from mopd.types import Prompt, Rollout, Routing, TeacherScores, concat_chunks


def score_batch(
    rollouts: Sequence[Rollout],
    teachers: Sequence[Teacher],
    router: Router,
    top_k: int | None = None,
    prompts: Mapping[int, Prompt] | None = None,
    concurrent: bool = False,
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
    k = common_top_k(teachers) if top_k is None else top_k
    lengths = [int(r.response_ids.numel()) for r in rollouts]
    if router.per_token:
        cross = [teachers[m].name for m in router.candidates() if is_cross_tokenizer(teachers[m])]
        if cross:
            raise TeacherError(f"per-token routing compares teachers token by token, but {cross} score chunks of "
                               "another tokenizer; route them per prompt (distill.router.granularity=prompt)")
        cand = router.candidates()
        got = _run([lambda m=m: teachers[m].score(rollouts, k) for m in cand], concurrent)
        routing, scores = router.route_tokens({m: TeacherScores.concat(g) for m, g in zip(cand, got)})
    else:
        per_rollout = router.route_prompts(rollouts, prompts)
        scores = _gather_by_teacher(rollouts, teachers, per_rollout, k, routed_label(names), concurrent)
        routing = router.expand(per_rollout, lengths)
    router.record(routing, lengths)
    return routing, scores


def is_cross_tokenizer(teacher: Teacher) -> bool:
    """Whether ``teacher`` reads the response as text in its own tokenizer (``CrossTokenizerTeacher``)."""
    return isinstance(teacher, CrossTokenizerTeacher)


def common_top_k(teachers: Sequence[Teacher]) -> int:
    """The K every teacher is configured with; a TeacherError listing them when they differ."""
    ks = {t.config.top_k for t in teachers}
    if len(ks) != 1:
        listed = ", ".join(f"{t.name}={t.config.top_k}" for t in teachers)
        raise TeacherError(f"teachers ask for different top_k ({listed}); a batch uses one K: set the same top_k "
                           f"on every teacher or pass top_k to score_batch")
    return ks.pop()


def _gather_by_teacher(
    rollouts: Sequence[Rollout], teachers: Sequence[Teacher], per_rollout: Sequence[int], top_k: int, label: str,
    concurrent: bool,
) -> TeacherScores:
    """One ``score`` call per routed teacher, rows reassembled in packing order."""
    used = sorted(set(per_rollout))
    groups = [[b for b, t in enumerate(per_rollout) if t == m] for m in used]
    got = _run([lambda m=m, g=g: teachers[m].score([rollouts[b] for b in g], top_k) for m, g in zip(used, groups)],
               concurrent)
    parts: list[TeacherScores | None] = [None] * len(rollouts)
    for group, scores in zip(groups, got):
        for b, s in zip(group, scores):
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
        chunks=concat_chunks(ready),  # cross-tokenizer teachers' alignment; same-vocab rows: one token each
    )


def _run(jobs: list[Callable[[], list[TeacherScores]]], concurrent: bool) -> list[list[TeacherScores]]:
    """Results in job order; the first failure propagates (its TeacherError names the teacher)."""
    if not concurrent or len(jobs) < 2:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="teacher") as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]
