"""Bad input to the distillation loss raises ObjectiveError naming the teacher, tensor, id and position."""

from __future__ import annotations

import pytest
import torch
from test_objectives import assert_matches_reference, make_case, ours

from mopd.config import ObjectiveConfig, ObjectiveName
from mopd.errors import ObjectiveError
from mopd.objectives import build_loss_fn, get_objective, mean_metrics
from mopd.types import TrainBatch

N_ = ObjectiveName


def _with(batch: TrainBatch, **fields) -> TrainBatch:
    return TrainBatch(**{f: fields.get(f, getattr(batch, f)) for f in batch.__dataclass_fields__})


def _loss(batch: TrainBatch, logits: torch.Tensor | None = None, objectives=None):
    student, _ = make_case()
    fn = build_loss_fn(objectives or {0: [ObjectiveConfig()]}, ["math"], tp_group=None, vocab_start=0,
                       vocab_size=21, chunk_tokens=4)
    return fn(student.float() if logits is None else logits, batch)


def _set(t: torch.Tensor, index: tuple, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def test_top_k_id_outside_the_vocabulary_names_teacher_id_and_position():
    _, batch = make_case()
    bad = _with(batch, topk_ids=_set(batch.topk_ids, (1, 3, 2), 22))  # a padding column
    with pytest.raises(ObjectiveError, match=r"teacher 'math': top-K id 22 at sequence 1, position 3 \(entry 2\) "
                                             r"is outside the vocabulary \[0, 21\)"):
        _loss(bad)
    with pytest.raises(ObjectiveError, match="top-K id -1 at sequence 0, position 4"):
        _loss(_with(batch, topk_ids=_set(batch.topk_ids, (0, 4, 0), -1)))


def test_non_finite_teacher_logprobs_name_teacher_and_position():
    _, batch = make_case()
    with pytest.raises(ObjectiveError, match=r"teacher 'math': non-finite topk_logprobs \(nan\) at sequence 0, "
                                             r"position 5 \(entry 1\)"):
        _loss(_with(batch, topk_logprobs=_set(batch.topk_logprobs, (0, 5, 1), float("nan"))))
    with pytest.raises(ObjectiveError, match=r"teacher 'math': non-finite sampled_logprob \(-inf\) at sequence 1, "
                                             r"position 2"):
        _loss(_with(batch, sampled_logprob=_set(batch.sampled_logprob, (1, 2), float("-inf"))))
    with pytest.raises(ObjectiveError, match=r"non-finite tail_logmass \(nan\) at sequence 0, position 7"):
        _loss(_with(batch, tail_logmass=_set(batch.tail_logmass, (0, 7), float("nan"))))


@pytest.mark.parametrize("name", [N_.forward_kl_topk, N_.jsd, N_.aopd])
def test_minus_infinity_top_k_entries_are_zero_probability_not_errors(name):
    """A -inf entry (an engine's padding of a short top-K, here a duplicate id) is an entry of
    probability 0: loss and gradient equal the float64 full-vocabulary reference, which gives it 0."""
    student, batch = make_case()
    lp = _set(batch.topk_logprobs, (0, 4, 4), float("-inf"))
    ids = _set(batch.topk_ids, (0, 4, 4), int(batch.topk_ids[0, 4, 0]))  # a padded duplicate is fine
    padded = _with(batch, topk_logprobs=lp, topk_ids=ids)
    objectives = {0: [ObjectiveConfig(name=name, beta=0.4)]}
    loss, grad, _ = assert_matches_reference(student, padded, objectives, 21, names=("math",))
    # The entry really changed the teacher (its mass left the top-K): not the unpadded loss.
    unpadded, _, _ = ours(student, batch, objectives, 21, names=("math",))
    assert abs(float(loss) - float(unpadded)) > 1e-6


def test_a_repeated_top_k_id_is_rejected_with_its_position():
    _, batch = make_case()
    ids = _set(batch.topk_ids, (1, 4, 3), int(batch.topk_ids[1, 4, 0]))
    with pytest.raises(ObjectiveError, match=f"top-K id {int(batch.topk_ids[1, 4, 0])} appears twice at sequence 1, "
                                             "position 4"):
        _loss(_with(batch, topk_ids=ids))


def test_shapes_that_do_not_match_the_response_tokens_are_named():
    student, batch = make_case()
    with pytest.raises(ObjectiveError, match=r"sampled_logprob has shape \(2, 7\), expected \(2, 8\)"):
        _loss(_with(batch, sampled_logprob=batch.sampled_logprob[:, :7]))
    with pytest.raises(ObjectiveError, match=r"topk_logprobs has shape \(2, 8, 4\), expected \(2, 8, 5\)"):
        _loss(_with(batch, topk_logprobs=batch.topk_logprobs[..., :4]))
    with pytest.raises(ObjectiveError, match=r"logits has shape \(2, 6, 24\), expected \(2, 8, 24\)"):
        _loss(batch, logits=student.float()[:, :6])


def test_a_target_outside_the_vocabulary_and_an_unknown_teacher_are_named():
    _, batch = make_case()
    with pytest.raises(ObjectiveError, match=r"target id 23 at sequence 0, position 6 is outside the vocabulary"):
        _loss(_with(batch, targets=_set(batch.targets, (0, 6), 23)))
    with pytest.raises(ObjectiveError, match=r"sequence 1, position 3 is routed to teacher index 4, which has no "
                                             r"objectives"):
        _loss(_with(batch, teacher_index=_set(batch.teacher_index, (1, 3), 4)))


def test_policy_gradient_inputs_are_checked_only_when_an_objective_reads_them():
    _, batch = make_case()
    beh = _set(batch.behaviour_logprobs, (0, 3), float("nan"))
    _loss(_with(batch, behaviour_logprobs=beh), objectives={0: [ObjectiveConfig(name=N_.reverse_kl_sampled)]})
    with pytest.raises(ObjectiveError, match=r"teacher 'math' \(importance ratio\): non-finite behaviour_logprobs "
                                             r"\(nan\) at sequence 0, position 3"):
        _loss(_with(batch, behaviour_logprobs=beh),
              objectives={0: [ObjectiveConfig(name=N_.reverse_kl_sampled, importance_ratio=True)]})
    with pytest.raises(ObjectiveError, match=r"teacher 'math' \(rlsd\): non-finite reward \(inf\) at sequence 1"):
        _loss(_with(batch, reward=torch.tensor([1.0, float("inf")])), objectives={0: [ObjectiveConfig(name=N_.rlsd)]})


def test_sft_only_teacher_ignores_placeholder_teacher_tensors():
    student, batch = make_case()
    placeholder = _with(batch, topk_ids=torch.zeros_like(batch.topk_ids),
                        topk_logprobs=torch.zeros_like(batch.topk_logprobs))
    loss, metrics = _loss(placeholder, objectives={0: [ObjectiveConfig(name=N_.cross_entropy)]})
    valid = batch.loss_mask > 0
    logp = torch.log_softmax(student[..., :21], -1).gather(-1, batch.targets[..., None])[..., 0]
    assert torch.isclose(loss.double(), -logp[valid].sum(), rtol=1e-5)
    assert "teacher/math/forward_kl" not in metrics


def test_bad_objective_settings_are_refused_when_the_loss_is_built():
    with pytest.raises(ObjectiveError, match=r"teacher 'math' objectives\[0\] \(jsd\): beta=1.0 must be in \(0, 1\)"):
        build_loss_fn({0: [ObjectiveConfig(name=N_.jsd, beta=1.0)]}, ["math"], tp_group=None, vocab_start=0,
                      vocab_size=21, chunk_tokens=4)
    with pytest.raises(ObjectiveError, match="entry_clip=0.1 has no vocabulary entries to clip in reverse_kl_sampled"):
        build_loss_fn({0: [ObjectiveConfig(name=N_.reverse_kl_sampled, entry_clip=0.1)]}, ["math"], tp_group=None,
                      vocab_start=0, vocab_size=21, chunk_tokens=4)
    with pytest.raises(ObjectiveError, match=r"objectives for teacher index 3, but there are 1 teachers"):
        build_loss_fn({3: [ObjectiveConfig()]}, ["math"], tp_group=None, vocab_start=0, vocab_size=21,
                      chunk_tokens=4)
    with pytest.raises(ObjectiveError, match=r"unknown objective 'kl'; valid: \['aopd', "):
        get_objective("kl")


def test_student_top_k_reverse_kl_without_teacher_logits_explains_why():
    _, batch = make_case()
    with pytest.raises(ObjectiveError, match="reverse_kl_student_topk needs an in-trainer teacher"):
        _loss(_with(batch, teacher_logits=None), objectives={0: [ObjectiveConfig(name=N_.reverse_kl_student_topk)]})


def test_mean_metrics_divide_by_each_teachers_token_count():
    sums = {"teacher/a/b/tokens": torch.tensor(4.0), "teacher/a/b/forward_kl": torch.tensor(2.0),
            "teacher/a/tokens": torch.tensor(2.0), "teacher/a/loss/jsd": torch.tensor(3.0), "train/lr": 0.1}
    assert mean_metrics(sums) == {"teacher/a/b/tokens": 4.0, "teacher/a/b/forward_kl": 0.5, "teacher/a/tokens": 2.0,
                                  "teacher/a/loss/jsd": 1.5, "train/lr": 0.1}
