"""Prompt sources: JSONL with bad records counted by line, a local HF dataset, synthetic, chat templates."""

import json
from dataclasses import replace

import pytest
import torch

from mopd.config import load_config
from mopd.config.run import DataConfig
from mopd.data.records import BadReason
from mopd.data.sources import PromptRenderer, build_source, hf_source, jsonl_source, synthetic_source
from mopd.data.synthetic import PiMode, generate
from mopd.data.tokenizer import build_char_tokenizer
from mopd.errors import DataError

TOK = build_char_tokenizer()

LINES = [
    json.dumps({"prompt": "rev:abc=", "domain": "reverse", "reference": "cba", "pi": "answer: cba", "src": "a"}),
    "",  # blank lines are not records
    '{"prompt": "rev:abd=", "domain": "reverse"',  # 3: invalid JSON
    json.dumps({"prompt": "add:12+30=", "domain": "addition", "reference": 24, "difficulty": 2}),
    json.dumps({"domain": "reverse", "reference": "x"}),  # 5: missing prompt
    json.dumps({"prompt": 5, "domain": "reverse"}),  # 6: wrong type
    json.dumps({"prompt": "hello", "domain": "poetry"}),  # 7: unknown domain
    json.dumps({"prompt": "rev:" + "a" * 40 + "=", "domain": "reverse"}),  # 8: too long
    json.dumps(["rev:abc="]),  # 9: not an object
    json.dumps({"prompt": "rev:xyz=", "domain": "reverse", "pi": [3]}),  # 10: wrong type (pi)
    json.dumps({"prompt": "rev:qrs="}),  # no domain field: "default", which is not a listed domain
    json.dumps({"prompt": "   ", "domain": "reverse"}),  # 12: empty prompt counts as missing
    json.dumps({"prompt": "rev:ok=", "domain": "reverse"}),
]


def write_jsonl(path, lines, extra: bytes = b""):
    path.write_bytes("\n".join(lines).encode() + b"\n" + extra)
    return path


def config(path, **kw) -> DataConfig:
    base = dict(source="jsonl", path=str(path), domains=["reverse", "addition"], max_prompt_tokens=20,
                max_bad_fraction=1.0)
    return DataConfig(**{**base, **kw})


def test_jsonl_loads_good_records_and_reports_each_bad_line_with_its_reason(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", LINES, extra=b'{"prompt": "\xff"}\n')
    src = jsonl_source(path, TOK, config(path))
    assert [p.text for p in src] == ["rev:abc=", "add:12+30=", "rev:ok="]
    assert [p.index for p in src] == [0, 1, 2]
    first, second = src[0], src[1]
    assert (first.domain, first.reference, first.pi, first.metadata) == ("reverse", "cba", "answer: cba", {"src": "a"})
    assert torch.equal(first.ids, torch.tensor(TOK.encode("rev:abc="))) and first.ids.dtype == torch.int64
    assert (second.reference, second.pi, second.metadata) == ("24", None, {"difficulty": "2"})
    report = src.report
    assert report.total == 13
    assert [(b.location, b.reason) for b in report.bad] == [
        (3, BadReason.invalid_json), (5, BadReason.missing_prompt), (6, BadReason.wrong_type),
        (7, BadReason.unknown_domain), (8, BadReason.too_long), (9, BadReason.not_an_object),
        (10, BadReason.wrong_type), (11, BadReason.unknown_domain), (12, BadReason.missing_prompt),
        (14, BadReason.invalid_json),
    ]
    assert report.counts() == {BadReason.invalid_json: 2, BadReason.missing_prompt: 2, BadReason.wrong_type: 2,
                               BadReason.unknown_domain: 2, BadReason.too_long: 1, BadReason.not_an_object: 1}
    assert "46 tokens > data.max_prompt_tokens=20" in report.bad[4].detail
    assert report.bad[3].detail == "domain 'poetry' is not one of data.domains ['addition', 'reverse']"
    assert report.bad[7].detail.startswith("no 'domain' field, so domain 'default', is not one of data.domains")


def test_too_many_bad_lines_stop_loading_with_the_file_counts_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", LINES)
    with pytest.raises(DataError) as err:
        jsonl_source(path, TOK, config(path, max_bad_fraction=0.5))
    msg = str(err.value)
    assert msg.startswith(f"{path}: 9 of 12 records are bad (75.0%)")
    for part in ("invalid_json 1 (line 3)", "missing_prompt 2 (lines 5, 12)", "wrong_type 2 (lines 6, 10)",
                 "unknown_domain 2 (lines 7, 11)", "too_long 1 (line 8)", "more than data.max_bad_fraction=0.5"):
        assert part in msg
    # exactly at the threshold still loads: 9/12 = 0.75
    assert len(jsonl_source(path, TOK, config(path, max_bad_fraction=0.75))) == 3


def test_many_bad_lines_of_one_reason_list_only_the_first_five(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["{"] * 8 + [json.dumps({"prompt": "a"})])
    with pytest.raises(DataError, match=r"invalid_json 8 \(lines 1, 2, 3, 4, 5, \.\.\.\)"):
        jsonl_source(path, TOK, config(path, domains=[], max_bad_fraction=0.1))


def test_a_file_with_no_usable_prompt_fails_even_with_full_tolerance(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["{", json.dumps({"prompt": 1})])
    with pytest.raises(DataError, match="2 of 2 records are bad .* no usable prompts"):
        jsonl_source(path, TOK, config(path))


def test_missing_file_and_field_names_from_config(tmp_path):
    with pytest.raises(DataError, match="data.path: JSONL file '.*nope.jsonl' does not exist"):
        jsonl_source(tmp_path / "nope.jsonl", TOK, config(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "rev:ab=", "task": "reverse", "answer": "ba",
                                                         "prompt": "ignored"})])
    cfg = config(path, prompt_field="question", domain_field="task", reference_field="answer", domains=[])
    (p,) = build_source(cfg, TOK)
    assert (p.text, p.domain, p.reference, p.metadata) == ("rev:ab=", "reverse", "ba", {"prompt": "ignored"})


def test_local_hf_dataset_saved_to_disk_is_a_source_with_bad_rows_counted(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"rev:{w}=", "domain": "reverse", "reference": w[::-1]} for w in ("abc", "hello", "xyz")]
    rows.append({"prompt": None, "domain": "reverse", "reference": "x"})  # row 3: missing prompt
    rows.append({"prompt": "poem", "domain": "poetry", "reference": None})  # row 4: unknown domain
    train = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "d"))

    src = hf_source(str(tmp_path / "dd"), TOK, config(tmp_path / "dd", source="hf"))
    assert [(p.index, p.text, p.reference) for p in src] == [(0, "rev:abc=", "cba"), (1, "rev:hello=", "olleh"),
                                                            (2, "rev:xyz=", "zyx")]
    assert [(b.location, b.reason) for b in src.report.bad] == [(3, BadReason.missing_prompt),
                                                               (4, BadReason.unknown_domain)]
    assert src.report.summary().endswith("missing_prompt 1 (row 3); unknown_domain 1 (row 4)")
    assert len(build_source(config(tmp_path / "dd", source="hf"), TOK, split="test")) == 1
    assert len(hf_source(str(tmp_path / "d"), TOK, config(tmp_path / "d", source="hf"))) == 3
    with pytest.raises(DataError, match=r"data.split: 'valid' is not a split of .*; splits: \['test', 'train'\]"):
        hf_source(str(tmp_path / "dd"), TOK, config(tmp_path / "dd", source="hf", split="valid"))
    with pytest.raises(DataError, match="2 of 5 records are bad"):
        hf_source(str(tmp_path / "d"), TOK, config(tmp_path / "d", source="hf", max_bad_fraction=0.2))


def test_local_parquet_file_loads_through_load_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"q": "rev:ab=", "domain": "reverse"}]).to_parquet(str(tmp_path / "x.parquet"))
    cfg = config(tmp_path / "x.parquet", source="hf", prompt_field="q")
    (p,) = hf_source(str(tmp_path / "x.parquet"), TOK, cfg, cache_dir=str(tmp_path / "cache"))
    assert p.text == "rev:ab=" and p.ids.tolist() == TOK.encode("rev:ab=")
    with pytest.raises(DataError, match="data.path: cannot load dataset '.*missing'"):
        hf_source(str(tmp_path / "missing"), TOK, config(tmp_path / "missing", source="hf"), cache_dir=str(tmp_path))


def test_synthetic_source_interleaves_domains_and_carries_reference_and_pi():
    src = synthetic_source(TOK, ["reverse", "addition"], num_prompts=5, split="eval", seed=2, pi_mode=PiMode.hint)
    rev, add = generate("reverse", 5, "eval", 2), generate("addition", 5, "eval", 2)
    assert [p.text for p in src] == [x.prompt for pair in zip(rev, add) for x in pair]
    assert [p.domain for p in src][:4] == ["reverse", "addition", "reverse", "addition"]
    assert src.domains == ["reverse", "addition"]
    assert all(p.reference == ex.reference and p.pi == ex.pi(PiMode.hint) for p, ex in zip(src.prompts[::2], rev))
    assert all(p.ids.tolist() == TOK.encode(p.text) for p in src)
    cfg = DataConfig(source="synthetic", domains=["reverse"], num_prompts=4, split="eval")
    assert [p.text for p in build_source(cfg, TOK, seed=2)] == [x.prompt for x in rev[:4]]
    with pytest.raises(DataError, match="data.domains: a synthetic source needs at least one domain"):
        build_source(replace(cfg, domains=[]), TOK)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
            "/nothink {% endif %}{% endif %}")


def test_prompts_are_rendered_with_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "rev:abc=", "domain": "reverse"})])
    (p,) = jsonl_source(path, tok, config(path, max_prompt_tokens=64))
    assert p.text == "rev:abc="
    assert p.ids.tolist() == TOK.encode("<user>rev:abc=\n<assistant>")  # one <bos>, from the template
    render = PromptRenderer(tok, enable_thinking=False)
    assert render("hi") == TOK.encode("<user>hi\n<assistant>/nothink ")
    cfg = load_config(overrides=["data.source=jsonl", f"data.path={path}", "data.enable_thinking=false"]).data
    (p,) = build_source(cfg, tok)
    assert p.ids.tolist() == TOK.encode("<user>rev:abc=\n<assistant>/nothink ")
    assert not PromptRenderer(TOK).uses_chat_template and PromptRenderer(tok).uses_chat_template


def test_conversational_prompts_render_every_message_and_keep_the_last_user_text(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev:ab="},
             {"role": "assistant", "content": "ba"}, {"role": "user", "content": "rev:cd="}]
    lines = [json.dumps({"prompt": convo, "domain": "reverse"}),
             json.dumps({"prompt": [{"role": "user"}], "domain": "reverse"}),  # 2: no content
             json.dumps({"prompt": [{"role": "system", "content": "x"}], "domain": "reverse"}),  # 3: no user turn
             json.dumps({"prompt": [], "domain": "reverse"})]  # 4: empty
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    src = jsonl_source(path, tok, config(path, max_prompt_tokens=100))
    (p,) = src
    assert p.text == "rev:cd="
    assert p.ids.tolist() == TOK.encode("<system>be brief\n<user>rev:ab=\n<assistant>ba\n<user>rev:cd=\n<assistant>")
    assert [(b.location, b.reason) for b in src.report.bad] == [
        (2, BadReason.wrong_type), (3, BadReason.missing_prompt), (4, BadReason.missing_prompt)]
    assert src.report.bad[0].detail == "prompt[0] is not a message with string 'role' and 'content'"
    with pytest.raises(DataError, match=r"c.jsonl line 1: a prompt is a list of chat messages but the tokenizer "
                                        r"has no chat template"):
        jsonl_source(path, TOK, config(path, max_prompt_tokens=100))


def test_prompts_carry_the_conversation_they_render_from_a_prompt_a_system_prompt_or_a_messages_field(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev:ab="}]
    lines = [json.dumps({"prompt": "rev:abc=", "domain": "reverse", "pi": 7}),
             json.dumps({"messages": convo, "domain": "reverse"}),
             json.dumps({"prompt": "rev:x=", "messages": convo, "domain": "reverse"}),  # 3: both
             json.dumps({"messages": "rev:y=", "domain": "reverse"})]  # 4: not a list
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    src = jsonl_source(path, tok, config(path, max_prompt_tokens=100, system_prompt="sys"))
    first, second = src
    assert first.messages == ({"role": "system", "content": "sys"}, {"role": "user", "content": "rev:abc="})
    assert first.ids.tolist() == TOK.encode("<system>sys\n<user>rev:abc=\n<assistant>") and first.pi == "7"
    assert second.messages == tuple(convo) and second.text == "rev:ab="  # a conversation keeps its own system
    assert [(b.location, b.reason) for b in src.report.bad] == [(3, BadReason.wrong_type), (4, BadReason.wrong_type)]
    assert "both 'prompt' and 'messages'" in src.report.bad[0].detail
    (plain,) = jsonl_source(path := write_jsonl(tmp_path / "p.jsonl", lines[:1]), TOK, config(path))
    assert plain.messages is None  # no chat template: a plain-text prompt
    with pytest.raises(DataError, match="data.system_prompt is set, but the tokenizer has no chat template"):
        jsonl_source(path, TOK, config(path, system_prompt="sys"))


def test_a_jsonl_runs_eval_split_reads_data_eval_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [json.dumps({"prompt": "rev:abc=", "domain": "reverse"})])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [json.dumps({"prompt": "rev:xyz=", "domain": "reverse"})])
    cfg = config(train, eval_path=str(held_out))
    assert [p.text for p in build_source(cfg, TOK)] == ["rev:abc="]
    assert [p.text for p in build_source(cfg, TOK, split="eval")] == ["rev:xyz="]
    with pytest.raises(DataError, match="data.eval_path: JSONL file .*nope.jsonl' does not exist"):
        build_source(config(train, eval_path=str(tmp_path / "nope.jsonl")), TOK, split="eval")
