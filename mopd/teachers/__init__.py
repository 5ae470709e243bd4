"""Teachers (expert, PI self-teacher), the start-up vocabulary check, the router, batch scoring and
TrainBatch packing. ``transport.py`` (top-K wire format) is imported on its own."""

from mopd.teachers.base import Teacher
from mopd.teachers.batching import build_train_batches
from mopd.teachers.build import build_teachers, check_pi_coverage
from mopd.teachers.expert import ExpertTeacher
from mopd.teachers.in_trainer import TeacherInputs, build_teacher_inputs
from mopd.teachers.router import RouteCounts, Router, mix_topk, route_counts, topk_entropy
from mopd.teachers.scoring import score_batch
from mopd.teachers.self_pi import SelfPITeacher
from mopd.teachers.vocab import VocabDifference, check_vocab, vocab_differences

__all__ = [
    "ExpertTeacher",
    "RouteCounts",
    "Router",
    "SelfPITeacher",
    "Teacher",
    "TeacherInputs",
    "VocabDifference",
    "build_teacher_inputs",
    "build_teachers",
    "build_train_batches",
    "check_pi_coverage",
    "check_vocab",
    "mix_topk",
    "route_counts",
    "score_batch",
    "topk_entropy",
    "vocab_differences",
]
