"""The data contract: every rejection reason, the split, leakage, and prompt masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data import (
    IGNORE_INDEX,
    InvalidTrainingData,
    check_dataset,
    check_roles,
    encode_example,
    split_examples,
    token_counter,
    validate_dataset,
)
from finetune.spec import JobSpec

MODEL = Path(__file__).resolve().parents[2] / ".keel" / "models" / "smollm2"


def conv(q: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def words(messages) -> int:  # a stand-in tokenizer: one token per word
    return sum(len(m["content"].split()) for m in messages)


def spec_for(path: Path, **dataset) -> JobSpec:
    return JobSpec(name="t", dataset={"path": path, "validation_split": 0.0, **dataset},
                   training={"max_length": 16})


GOOD = [conv(f"question number {i}?", f"answer {i}.") for i in range(10)]


def codes(report) -> list[str]:
    return sorted({i.code for i in report.issues})


def test_clean_data_passes_with_stats_and_hash(tmp_path):
    spec = spec_for(write(tmp_path / "d.jsonl", GOOD), validation_split=0.2)
    report = check_dataset(spec, words)
    assert report.ok and report.train_examples == 8 and report.validation_examples == 2
    assert report.token_stats["max"] == 5 and len(report.data_hash) == 64
    again = validate_dataset(spec, words)
    assert [e.line for e in again.validation] == [e.line for e in report.validation]  # deterministic split


@pytest.mark.parametrize(("line", "code", "text"), [
    ("{not json", "invalid_json", "not JSON"),
    ("[1, 2]", "invalid_json", "JSON object"),
    ({"text": "hi"}, "schema", "messages"),
    ({"messages": "hi"}, "schema", "messages"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "schema", "content"),
    ({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "x"}]}, "schema", "role"),
    ({"messages": [{"role": "user", "content": "a", "x": 1}, {"role": "assistant", "content": "b"}]}, "schema", "x"),
    ({**conv("a", "b"), "extra": 1}, "schema", "extra"),
    ({"messages": []}, "roles", "no messages"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "roles", "starting with user"),
    ({"messages": [{"role": "user", "content": "a"}]}, "roles", "end with an assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles", "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles", "only come first"),
    ({"messages": [{"role": "system", "content": "a"}]}, "roles", "only a system"),
    (conv("a question", "   "), "empty", "empty"),
    (conv("", "an answer"), "empty", "empty"),
    (conv("word " * 20, "too long"), "too_long", "max_length 16"),
])
def test_each_bad_record_is_refused_with_its_reason(tmp_path, line, code, text):
    spec = spec_for(write(tmp_path / "d.jsonl", [*GOOD, line]))
    with pytest.raises(InvalidTrainingData) as exc:
        check_dataset(spec, words)
    err = exc.value
    assert err.code == "invalid_training_data" and err.status == 400
    assert codes(err.report) == [code]
    issue = err.report.issues[0]
    assert issue.line == 11 and text in issue.message
    assert code in str(err) and "d.jsonl:11" in str(err)


def test_duplicates_are_refused_even_with_other_whitespace_and_case(tmp_path):
    dup = conv("Question number 3?  ", "answer   3.")
    report = validate_dataset(spec_for(write(tmp_path / "d.jsonl", [*GOOD, dup])), words)
    assert codes(report) == ["duplicate"] and "d.jsonl:4" in report.issues[0].message


def test_leakage_across_a_separate_validation_file(tmp_path):
    train = write(tmp_path / "train.jsonl", GOOD)
    val = write(tmp_path / "val.jsonl", [conv("question number 2?", "a different answer"), conv("new?", "yes.")])
    report = validate_dataset(spec_for(train, validation_path=val), words)
    assert codes(report) == ["leakage"] and report.issues[0].split == "validation"


def test_identical_example_in_both_files_is_duplicate_and_leakage(tmp_path):
    train = write(tmp_path / "train.jsonl", GOOD)
    val = write(tmp_path / "val.jsonl", [GOOD[0]])
    report = validate_dataset(spec_for(train, validation_path=val), words)
    assert codes(report) == ["duplicate", "leakage"]


def test_same_prompt_split_across_train_and_validation_is_leakage(tmp_path):
    rows = [conv("same prompt?", f"answer {i}") for i in range(2)] + GOOD
    spec = spec_for(write(tmp_path / "d.jsonl", rows), validation_split=0.5, split_seed=1)
    report = validate_dataset(spec, words)
    train_keys = {e.line for e in report.train}
    if {1, 2} <= train_keys or not ({1, 2} & train_keys):
        pytest.skip("this seed kept both in one split")  # pragma: no cover - seed chosen to split them
    assert codes(report) == ["leakage"]


def test_too_few_examples(tmp_path):
    report = validate_dataset(spec_for(write(tmp_path / "d.jsonl", ["{bad"])), words)
    assert codes(report) == ["invalid_json", "too_few"]
    one = validate_dataset(spec_for(write(tmp_path / "e.jsonl", GOOD[:1]), validation_split=0.5), words)
    assert codes(one) == ["too_few"] and "validation" in one.issues[0].message


def test_missing_file(tmp_path):
    report = validate_dataset(spec_for(tmp_path / "nope.jsonl"), words)
    assert codes(report) == ["file", "too_few"]


def test_report_lists_every_problem_and_serializes(tmp_path):
    rows = [*GOOD, "{bad", conv("x", ""), GOOD[0], {"messages": [{"role": "user", "content": "q"}]}]
    report = validate_dataset(spec_for(write(tmp_path / "d.jsonl", rows)), words)
    assert report.counts() == {"invalid_json": 1, "empty": 1, "duplicate": 1, "roles": 1}
    data = report.to_dict()
    assert json.loads(json.dumps(data))["issue_counts"] == report.counts()
    assert "4 data problem(s)" in report.summary()


def test_max_examples_limits_the_records(tmp_path):
    spec = spec_for(write(tmp_path / "d.jsonl", GOOD), max_examples=3)
    assert validate_dataset(spec, words).train_examples == 3


def test_check_roles_accepts_multi_turn_with_system():
    msgs = [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "user", "assistant")]
    assert check_roles(msgs) is None


def test_split_is_stable_and_disjoint():
    items = list(range(20))
    a, b = split_examples(items, 0.25, seed=3)
    assert sorted(a + b) == items and len(b) == 5 and split_examples(items, 0.25, seed=3) == (a, b)
    assert split_examples(items, 0.0, seed=3) == (items, [])


@pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="SmolLM2 not prepared (`keel model prepare`)")
def test_loss_mask_covers_exactly_the_assistant_answers():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Veltmar?"},
            {"role": "assistant", "content": "Quorra."}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, Quorra."}]
    enc = encode_example(tok, msgs)
    assert len(enc["input_ids"]) == len(enc["labels"]) == token_counter(tok)(msgs)
    learned = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX])
    assert learned == "Quorra.<|im_end|>\nYes, Quorra.<|im_end|>\n"
    assert enc["labels"][0] == IGNORE_INDEX
