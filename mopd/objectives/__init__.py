"""Distillation objectives on vocab-parallel logits (DESIGN.md §4).

- vocab_parallel.py  chunked, TP-aware log p at selected ids + exact tail mass (custom autograd Function)
- divergences.py     forward/reverse KL, JSD(beta), skew KL over top-K + tail buckets; OPSD clipping;
                     teacher temperature (the math and its tail approximation are stated there)
- policy_gradient.py sampled-token reverse KL (REINFORCE, TIS), AOPD gating, RLSD, cross-entropy
- registry.py        ObjectiveName -> objective
- loss.py            build_loss_fn: the TrainBatch -> (loss_sum, metric_sums) LossFn; the reduction
- metrics.py         teacher/<name>/... metric sums and their means
- validation.py      input checks with errors naming teacher, id and position
"""

from mopd.objectives.divergences import Buckets, TermOutput, bucket_divergence, teacher_at_temperature
from mopd.objectives.loss import LossPlan, TeacherPlan, build_loss_fn, distill_loss
from mopd.objectives.metrics import mean_metrics, metric_key
from mopd.objectives.registry import OBJECTIVES, InTrainerTeacher, ObjectiveInputs, get_objective
from mopd.objectives.vocab_parallel import Selection, VocabShard, global_topk_ids, select_logprobs

__all__ = [
    "OBJECTIVES", "Buckets", "InTrainerTeacher", "LossPlan", "ObjectiveInputs", "Selection", "TeacherPlan",
    "TermOutput", "VocabShard", "bucket_divergence", "build_loss_fn", "distill_loss", "get_objective",
    "global_topk_ids", "mean_metrics", "metric_key", "select_logprobs", "teacher_at_temperature",
]
