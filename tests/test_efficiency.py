"""Teacher-token curves (mopd/efficiency.py): cumulative tokens per evaluation, first crossing of a
target and values at a budget, linear between evaluations and never extrapolated."""

from mopd.efficiency import Curve, ratio_line, stage_curve, tokens_to_reach, value_at


def test_stage_curve_accumulates_teacher_tokens_up_to_each_evaluation_and_ends_with_the_final_one():
    history = [{"step": 1.0, "train/tokens": 100.0}, {"step": 2.0, "train/tokens": 50.0},
               {"step": 2.0, "eval/d/greedy_accuracy": 0.4, "eval/d/pass@1": 0.3},
               {"step": 3.0, "train/tokens": 70.0}]
    final = {"d": {"greedy_accuracy": 0.8, "pass_at": {"1": 0.6}}}
    assert stage_curve(history, final, "d", start=0.1) == Curve((0.0, 150.0, 220.0), (0.1, 0.4, 0.8))
    assert stage_curve(history, final, "d", "pass@1") == Curve((150.0, 220.0), (0.3, 0.6))
    # the final evaluation is not repeated when the last periodic one was at the last step
    assert stage_curve(history[:3], final, "d").tokens == (150.0,)


def test_tokens_to_reach_interpolates_between_the_bracketing_evaluations():
    curve = Curve((0.0, 100.0, 300.0), (0.2, 0.5, 0.9))
    assert tokens_to_reach(curve, 0.2) == 0.0
    assert abs(tokens_to_reach(curve, 0.7) - (100.0 + 0.2 / 0.4 * 200.0)) < 1e-9
    assert tokens_to_reach(curve, 0.95) is None
    assert abs(value_at(curve, 200.0) - 0.7) < 1e-12
    assert value_at(curve, 301.0) is None and value_at(curve, 300.0) == 0.9


def test_ratio_line_says_not_reached_with_a_bound():
    opd = Curve((0.0, 100.0, 200.0), (0.0, 0.9, 1.0))
    sft = Curve((0.0, 100.0, 200.0), (0.0, 0.45, 0.9))
    line, ratio = ratio_line("d", sft, opd, 0.9)
    assert ratio == 2.0 and "SFT needs 200 teacher tokens, opd 100 (ratio 2.00x)" in line
    line, ratio = ratio_line("d", Curve((0.0, 200.0), (0.0, 0.5)), opd, 0.9)
    assert ratio is None and "SFT does not reach 0.900 within 200" in line and "ratio > 2.00x" in line


def test_the_run_summary_states_the_ratio_from_the_runs_own_evaluations():
    from mopd.config import load_config
    from mopd.stages.context import StageOutput
    from mopd.summary import build_summary

    config = load_config(None, ["distill.teachers=[{name: t, checkpoint: expert, domains: [d]}]"])

    def out(name, role, acc, history=()):
        return StageOutput(name=name, kind="opd" if role == "student" else "sft", role=role, hf_dir=None, wall_s=1.0,
                           eval={"d": {"greedy_accuracy": acc, "pass_at": {}}}, history=list(history))

    steps = lambda tokens, accs: [r for t, a in zip(tokens, accs)  # noqa: E731
                                  for r in ({"step": 1.0, "train/tokens": t}, {"step": 1.0, "eval/d/greedy_accuracy": a})]
    outputs = {"base": out("base", "base", 0.0), "expert": out("expert", "teacher", 1.0),
               "unify": out("unify", "student", 1.0, steps([100.0, 100.0], [0.9, 1.0])),
               "sft_baseline": out("sft_baseline", "sft_baseline", 1.0, steps([100.0, 100.0], [0.45, 0.9]))}
    lines = build_summary(config, outputs, [])["verdicts"]["plainly"]
    assert any(line.startswith("teacher tokens to 90% of the expert, d: SFT needs 200 teacher tokens, opd 100 "
                               "(ratio 2.00x)") for line in lines), lines
