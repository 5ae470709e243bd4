"""The run summary: accuracies by role per domain, and its plain verdicts."""

import json

from mopd.config import load_config
from mopd.stages.context import StageOutput
from mopd.summary import build_summary, write_summary


def output(name: str, role: str, acc: dict[str, float], kind: str = "sft") -> StageOutput:
    return StageOutput(name=name, kind=kind, role=role, hf_dir=None, wall_s=1.0,
                       eval={d: {"greedy_accuracy": a} for d, a in acc.items()},
                       history=[{"step": 1.0, "teacher/rx/kl_sample": 0.5, "eval/rev/greedy_accuracy": 0.2},
                                {"step": 2.0, "teacher/rx/kl_sample": 0.1, "eval/rev/greedy_accuracy": 0.8}])


def test_summary_compares_the_student_with_its_expert_and_both_baselines(tmp_path):
    config = load_config(None, ["distill.teachers=[{name: rx, checkpoint: ex_rev, domains: [rev]}, "
                                "{name: cx, checkpoint: ex_rot, domains: [rot]}]"])
    outputs = {
        "base": output("base", "base", {"rev": 0.1, "rot": 0.0}),
        "ex_rev": output("ex_rev", "teacher", {"rev": 0.9, "rot": 0.0}),
        "ex_rot": output("ex_rot", "teacher", {"rev": 0.0, "rot": 1.0}),
        "unify": output("unify", "student", {"rev": 0.85, "rot": 0.8}, kind="opd"),
        "sft_b": output("sft_b", "sft_baseline", {"rev": 0.86, "rot": 0.5}),
        "avg": output("avg", "weight_average", {"rev": 0.2, "rot": 0.3}),
    }
    summary = build_summary(config, outputs, warnings=["unify: entropy fell"])
    rev, rot = summary["domains"]["rev"], summary["domains"]["rot"]
    assert (rev["teacher"], rev["teacher_stage"], rot["teacher"]) == (0.9, "ex_rev", 1.0)
    assert abs(rev["student_over_teacher"] - 0.85 / 0.9) < 1e-4 and rev["reaches_90pct_of_teacher"]
    assert not rot["reaches_90pct_of_teacher"]  # 0.8 / 1.0
    assert rev["beats_sft_baseline"] is False and rot["beats_sft_baseline"] is True
    verdicts = summary["verdicts"]
    assert verdicts["student_reaches_90pct_of_teacher_on_every_domain"] is False
    assert verdicts["student_beats_weight_average_on_every_domain"] is True
    assert verdicts["student_beats_sft_baseline_on_every_domain"] is False
    assert any("does not beat sft_baseline" in line for line in verdicts["plainly"])
    assert "rev: base 0.100 -> student 0.850 (+0.750 greedy accuracy)" in verdicts["plainly"]
    path = write_summary(tmp_path, summary, outputs)
    assert json.loads(path.read_text())["warnings"] == ["unify: entropy fell"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000


def test_a_tie_with_a_baseline_is_called_a_tie_not_a_win():
    config = load_config(None, ["distill.teachers=[{name: rx, checkpoint: ex, domains: [rev]}]"])
    outputs = {"ex": output("ex", "teacher", {"rev": 1.0}), "unify": output("unify", "student", {"rev": 1.0}, "opd"),
               "sft_b": output("sft_b", "sft_baseline", {"rev": 1.0})}
    summary = build_summary(config, outputs, warnings=[])
    assert summary["domains"]["rev"]["vs_sft_baseline"] == "ties with"
    assert any("ties with sft_baseline (1.000)" in line for line in summary["verdicts"]["plainly"])
    assert summary["verdicts"]["student_beats_sft_baseline_on_every_domain"] is False


def test_an_opd_stage_evaluated_at_its_start_reports_accuracy_and_teacher_kl_before_and_after():
    config = load_config(None, ["distill.teachers=[{name: self, kind: self_pi, shared_pi: rule}]",
                                "eval.teacher_kl=[self]"])
    opsd = StageOutput(name="opsd", kind="opd", role="student", hf_dir=None, wall_s=1.0,
                       eval={"identity": {"greedy_accuracy": 0.625, "teacher_kl": {"self": 0.21}}},
                       history=[{"step": 0.0, "eval/identity/greedy_accuracy": 0.0,
                                 "eval/identity/teacher_kl/self": 0.93},
                                {"step": 1.0, "teacher/self/kl_sample": 0.8}])
    summary = build_summary(config, {"opsd": opsd}, warnings=[])
    assert summary["before_after"] == {"opsd": {"identity": {
        "greedy_accuracy": {"before": 0.0, "after": 0.625},
        "teacher_kl": {"self": {"before": 0.93, "after": 0.21}}}}}
    assert ("identity (opsd, before -> after): greedy accuracy 0.000 -> 0.625; KL to self 0.930 -> 0.210 "
            "nats/token") in summary["verdicts"]["plainly"]
    no_start = StageOutput(**{**vars(opsd), "history": opsd.history[1:]})
    assert build_summary(config, {"opsd": no_start}, warnings=[])["before_after"] == {}
