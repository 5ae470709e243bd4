"""Config loading: YAML + overrides onto the typed tree, and every kind of bad input named by its key."""

from pathlib import Path

import pytest

from mopd.config import Fp8Recipe, RunConfig, load_config, to_yaml
from mopd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def error_of(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_build_a_frozen_tree():
    config = load_config()
    assert isinstance(config, RunConfig)
    with pytest.raises(AttributeError):
        config.student.model.num_layers = 3  # type: ignore[misc]


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nstudent:\n  model:\n    num_layers: 6\n    hidden_size: 96\n")
    config = load_config(path, ["student.model.num_layers=3", "student.precision.fp8=none"])
    assert (config.name, config.student.model.num_layers, config.student.model.hidden_size) == ("x", 3, 96)
    assert config.student.precision.fp8 is Fp8Recipe.none


def test_yaml_include_and_interpolation(tmp_path):
    (tmp_path / "base.yaml").write_text("student:\n  model:\n    vocab_size: 300\n")
    (tmp_path / "run.yaml").write_text(
        "include: base.yaml\ndata:\n  max_prompt_tokens: ${student.model.vocab_size}\n"
    )
    config = load_config(tmp_path / "run.yaml")
    assert config.data.max_prompt_tokens == 300


def test_unknown_key_names_the_dotted_key_and_the_valid_keys():
    message = error_of(["student.model.hiden_size=64"])
    assert "student.model.hiden_size" in message and "hidden_size" in message


def test_unknown_key_inside_a_list_names_the_list_index():
    message = error_of(["distill.teachers=[{name: a}, {name: b, domian: x}]"])
    assert "distill.teachers[1].domian" in message and "domains" in message


def test_wrong_type_names_key_and_value():
    message = error_of(["student.train.steps=many"])
    assert "student.train.steps" in message and "many" in message


def test_bad_choice_lists_the_valid_choices():
    message = error_of(["student.precision.fp8=fp4"])
    assert "student.precision.fp8" in message and "fp4" in message and "tensorwise" in message


def test_nested_list_choice_error_has_full_path():
    message = error_of(["distill.teachers=[{name: a, objectives: [{name: jsd}, {name: kl}]}]"])
    assert "distill.teachers[0].objectives[1].name" in message and "forward_kl_topk" in message


def test_out_of_range_value_names_key_value_and_bound():
    message = error_of(["student.optimizer.lr=-0.1"])
    assert "student.optimizer.lr=-0.1" in message and ">= 0" in message


def test_jsd_beta_at_an_endpoint_is_refused():
    message = error_of(["distill.objectives=[{name: jsd, beta: 0.0}]"])
    assert "distill.objectives[0].beta" in message


def test_missing_required_key_is_named():
    message = error_of(["distill.teachers=[{domains: [math]}]"])
    assert "distill.teachers[0].name" in message and "required" in message


def test_tensor_parallel_that_does_not_divide_heads_is_refused():
    message = error_of(["student.model.num_attention_heads=6", "student.parallel.tensor_parallel=4"])
    assert "student.parallel.tensor_parallel=4" in message and "num_attention_heads=6" in message


def test_pipeline_that_does_not_divide_layers_is_refused():
    message = error_of(["student.model.num_layers=3", "student.parallel.pipeline_parallel=2"])
    assert "student.parallel.pipeline_parallel=2" in message and "num_layers=3" in message


def test_router_rule_must_name_a_known_teacher():
    message = error_of(["distill.teachers=[{name: math}]", "distill.router.rules=[{teacher: code, domain: code}]"])
    assert "distill.router.rules[0].teacher" in message and "math" in message


def test_fp8_without_bf16_is_refused():
    message = error_of(["student.precision.fp8=delayed"])
    assert "student.precision.fp8" in message and "bf16" in message


def test_bad_override_syntax_and_missing_file_are_clear(tmp_path):
    assert "dotted.key=value" in error_of(["student.model.num_layers"])
    assert str(tmp_path / "nope.yaml") in error_of([], str(tmp_path / "nope.yaml"))


def test_all_problems_are_reported_at_once():
    message = error_of(["student.train.steps=0", "student.optimizer.clip_grad=-1"])
    assert "student.train.steps=0" in message and "student.optimizer.clip_grad=-1" in message


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["student.model.num_layers=3", "distill.teachers=[{name: a, domains: [x]}]"])
    path = tmp_path / "dump.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_warmup_longer_than_training_is_refused():
    message = error_of(["student.train.steps=5", "student.optimizer.warmup_steps=5"])
    assert "student.optimizer.warmup_steps=5" in message and "train.steps=5" in message


def test_a_bad_stage_override_is_reported_before_anything_runs(tmp_path):
    from mopd.pipeline import run_pipeline

    config = load_config(None, ["stages=[{name: a, kind: sft}, {name: b, kind: sft, overrides: [student.train.steps=0]}]",
                                f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="stage 'b'.*student.train.steps=0"):
        run_pipeline(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["checkpoint.load", "checkpoint.dir"])
def test_removed_checkpoint_keys_are_refused_naming_the_key_and_what_to_use(key, tmp_path):
    section, name = key.split(".")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {name}: /ckpt/model-mcore\n")
    message = error_of([], str(tmp_path / "old.yaml"))
    assert message.startswith(f"{key}: unknown key")
    if key == "checkpoint.load":
        assert "init_from" in message and "tools/convert_hf.py import" in message
    assert error_of([f"{key}=/x"]).startswith(f"{key}: unknown key")


def test_an_override_reaches_into_a_list_element_with_either_syntax(tmp_path):
    (tmp_path / "run.yaml").write_text("distill:\n  teachers:\n    - {name: a, top_k: 8, domains: [x]}\n"
                                       "    - {name: b, objectives: [{name: forward_kl_topk}]}\n")
    config = load_config(tmp_path / "run.yaml", ["distill.teachers.0.top_k=32", "distill.teachers[1].top_k=16",
                                                 "distill.teachers[1].objectives.0.entry_clip=0.1",
                                                 "distill.teachers.0.domains[0]=y"])
    a, b = config.distill.teachers
    assert (a.name, a.top_k, a.domains, b.name, b.top_k, b.objectives[0].entry_clip) == ("a", 32, ["y"], "b", 16, 0.1)
    # later overrides see earlier ones, whole-list and element overrides alike
    later = load_config(tmp_path / "run.yaml", ["distill.teachers=[{name: c}]", "distill.teachers.0.top_k=4"])
    assert [(t.name, t.top_k) for t in later.distill.teachers] == [("c", 4)]


def test_a_bad_list_element_override_names_the_element():
    base = ["distill.teachers=[{name: a}, {name: b}]"]
    assert "distill.teachers[5] does not exist (distill.teachers has 2 element(s)); set the whole list" in error_of(
        [*base, "distill.teachers[5].top_k=3"])
    assert "distill.teachers[0].topk: unknown key" in error_of([*base, "distill.teachers.0.topk=3"])
    assert "distill.teachers[0].top_k" in error_of([*base, "distill.teachers[0].top_k=abc"])
