"""From rollouts to this rank's micro-batches, and the supervised (one-hot teacher) case.

Global rank 0 generates, scores and packs the whole global batch; every rank receives the list and
keeps its data-parallel share (all TP/PP ranks of a replica take the same micro-batches). SFT is
distillation from a one-hot "reference" teacher: top-1 id = the reference token with logprob 0,
so the same packing, train step and metrics serve both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mopd.config import ObjectiveConfig, ObjectiveName, StudentConfig
from mopd.errors import DataError
from mopd.objectives import build_loss_fn
from mopd.parallel import ParallelLayout
from mopd.stages.context import broadcast
from mopd.student import padded_vocab_size
from mopd.types import LossFn, Prompt, Rollout, Routing, TeacherScores, TrainBatch

REFERENCE = "reference"


def reference_rollout(prompt: Prompt, tokenizer, max_new_tokens: int) -> Rollout:
    """The prompt's reference answer (plus EOS) as if the student had sampled it."""
    if prompt.reference is None:
        raise DataError(f"prompt {prompt.index} (domain {prompt.domain!r}) has no reference answer for SFT")
    ids = tokenizer(prompt.reference, add_special_tokens=False)["input_ids"][:max_new_tokens - 1]
    response = torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)
    return Rollout(prompt_ids=prompt.ids, response_ids=response, behaviour_logprobs=torch.zeros(len(response)),
                   finish="stop", weight_version=0, domain=prompt.domain, prompt_index=prompt.index,
                   pi=prompt.pi, reference=prompt.reference, text=prompt.reference)


def one_hot_scores(rollouts: Sequence[Rollout]) -> tuple[Routing, TeacherScores]:
    """Scores of a teacher that puts all its mass on each response token."""
    ids = torch.cat([r.response_ids for r in rollouts]).to(torch.int32)
    n = ids.numel()
    scores = TeacherScores(topk_ids=ids[:, None], topk_logprobs=torch.zeros(n, 1),
                           sampled_logprob=torch.zeros(n), tail_logmass=torch.full((n,), float("-inf")),
                           teacher=REFERENCE)
    return Routing(teachers=(REFERENCE,), index=torch.zeros(n, dtype=torch.long)), scores


def my_share(batches: list[TrainBatch] | None, layout: ParallelLayout) -> list[TrainBatch]:
    """Broadcast rank 0's micro-batches; keep this data-parallel rank's contiguous share."""
    batches = broadcast(batches)
    if len(batches) % layout.dp:
        raise DataError(f"{len(batches)} micro-batches do not split over {layout.dp} data-parallel ranks")
    per_rank = len(batches) // layout.dp
    return batches[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]


def loss_fn_for(cfg: StudentConfig, layout: ParallelLayout, objectives: dict[int, list[ObjectiveConfig]],
                teacher_names: Sequence[str], coefs: dict[int, float] | None = None) -> LossFn:
    """The objectives on this TP rank's vocabulary slice."""
    local = padded_vocab_size(cfg.model, layout.tp) // layout.tp
    return build_loss_fn(objectives, tuple(teacher_names), tp_group=layout.tp_group if layout.tp > 1 else None,
                         vocab_start=layout.tp_rank * local, vocab_size=cfg.model.vocab_size,
                         chunk_tokens=cfg.train.loss_chunk_tokens, teacher_coefs=coefs)


def sft_loss_fn(cfg: StudentConfig, layout: ParallelLayout) -> LossFn:
    return loss_fn_for(cfg, layout, {0: [ObjectiveConfig(name=ObjectiveName.cross_entropy)]}, (REFERENCE,))
