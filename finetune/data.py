"""Training-data validation (the data contract) and tokenization with prompt masking.

Every record is one JSON object per line: ``{"messages": [{"role", "content"}, ...]}``
(optional ``id`` and ``metadata``). The contract, checked before any training starts:

* ``invalid_json``  the line is not a JSON object
* ``schema``        wrong or missing fields / types (unknown keys are refused too)
* ``roles``         an optional system message first, then user/assistant alternating,
                    starting with user and ending with assistant
* ``empty``         a message whose content is empty or only whitespace
* ``too_long``      the example is longer than ``training.max_length`` tokens with the base
                    model's chat template (refused, never silently truncated)
* ``duplicate``     the same conversation appears more than once
* ``leakage``       a validation prompt also appears in the training data
* ``too_few``       no training examples, or no validation examples when a split was asked for
* ``file``          the dataset file cannot be read

:func:`validate_dataset` returns a :class:`DataReport`; :func:`check_dataset` raises
:class:`InvalidTrainingData` (code ``invalid_training_data``) with the reasons.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from app.core.errors import InvalidRequest
from finetune.spec import JobSpec

IssueCode = Literal["invalid_json", "schema", "roles", "empty", "too_long", "duplicate", "leakage", "too_few", "file"]
Messages = list[dict[str, str]]
IGNORE_INDEX = -100


class InvalidTrainingData(InvalidRequest):
    """The dataset breaks the data contract; training refuses to start. ``report`` says why."""

    code = "invalid_training_data"

    def __init__(self, message: str, *, report: DataReport | None = None) -> None:
        super().__init__(message, param="dataset")
        self.report = report



class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[_Message]
    id: str | int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Issue:
    code: IssueCode
    message: str
    file: str = ""
    line: int | None = None
    split: str = ""

    def __str__(self) -> str:
        where = f"{Path(self.file).name}:{self.line}" if self.line is not None else Path(self.file).name
        return f"[{self.code}] {where + ': ' if where else ''}{self.message}"


@dataclass(slots=True)
class Example:
    messages: Messages
    file: str
    line: int
    tokens: int = 0


@dataclass(slots=True)
class DataReport:
    ok: bool
    issues: list[Issue]
    train_examples: int
    validation_examples: int
    data_hash: str
    files: list[str]
    token_stats: dict[str, float] = field(default_factory=dict)
    train: list[Example] = field(default_factory=list, repr=False)
    validation: list[Example] = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        return dict(Counter(i.code for i in self.issues))

    def summary(self, limit: int = 10) -> str:
        if self.ok:
            return (f"data OK: {self.train_examples} train / {self.validation_examples} validation examples, "
                    f"tokens min/mean/max {self.token_stats.get('min', 0):.0f}/"
                    f"{self.token_stats.get('mean', 0):.0f}/{self.token_stats.get('max', 0):.0f}")
        counts = ", ".join(f"{code}: {n}" for code, n in sorted(self.counts().items()))
        shown = "; ".join(str(i) for i in self.issues[:limit])
        more = f"; ... and {len(self.issues) - limit} more" if len(self.issues) > limit else ""
        return f"{len(self.issues)} data problem(s) ({counts}): {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "train_examples": self.train_examples, "validation_examples": self.validation_examples,
            "data_hash": self.data_hash, "files": self.files, "token_stats": self.token_stats,
            "issue_counts": self.counts(),
            "issues": [{"code": i.code, "message": i.message, "file": i.file, "line": i.line, "split": i.split}
                       for i in self.issues],
        }


# -- records -------------------------------------------------------------------------------------


def check_roles(messages: Sequence[dict[str, str]]) -> str | None:
    """None when the order is valid, else the reason."""
    roles = [m["role"] for m in messages]
    if not roles:
        return "no messages"
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "a system message may only come first"
    if not body:
        return "only a system message"
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"message {i + (len(roles) - len(body))} is {role!r} where {expected!r} was expected " \
                   "(user and assistant must alternate, starting with user)"
    if body[-1] != "assistant":
        return "the conversation must end with an assistant message (the training target)"
    return None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def conversation_key(messages: Messages) -> str:
    return json.dumps([[m["role"], _norm(m["content"])] for m in messages])


def prompt_key(messages: Messages) -> str:
    """The conversation without its final assistant answer: what the model is asked."""
    return conversation_key(messages[:-1])


def read_jsonl(path: Path, split: str) -> tuple[list[Example], list[Issue]]:
    examples: list[Example] = []
    issues: list[Issue] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Issue("file", f"cannot read {path}: {exc}", str(path), None, split)]
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            issues.append(Issue("invalid_json", f"not JSON ({exc.msg})", str(path), n, split))
            continue
        if not isinstance(obj, dict):
            issues.append(Issue("invalid_json", f"a record must be a JSON object, got {type(obj).__name__}",
                                str(path), n, split))
            continue
        try:
            record = _Record.model_validate(obj)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors())
            issues.append(Issue("schema", detail, str(path), n, split))
            continue
        messages = [m.model_dump() for m in record.messages]
        reason = check_roles(messages)
        if reason:
            issues.append(Issue("roles", reason, str(path), n, split))
            continue
        empty = [i for i, m in enumerate(messages) if not m["content"].strip()]
        if empty:
            issues.append(Issue("empty", f"message(s) {empty} have empty content", str(path), n, split))
            continue
        examples.append(Example(messages, str(path), n))
    return examples, issues


def split_examples(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out: the same seed and data always give the same split."""
    if share <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * share))
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    return h.hexdigest()


# -- the contract --------------------------------------------------------------------------------


def validate_dataset(spec: JobSpec, count_tokens: Callable[[Messages], int] | None) -> DataReport:
    """Check every record; ``count_tokens`` (from :func:`token_counter`) enables the length check."""
    ds = spec.dataset
    files = [ds.path] + ([ds.validation_path] if ds.validation_path else [])
    issues: list[Issue] = []
    examples, found = read_jsonl(ds.path, "train")
    issues += found
    if ds.max_examples is not None:
        examples = examples[: ds.max_examples]
    if ds.validation_path is not None:
        val, found = read_jsonl(ds.validation_path, "validation")
        issues += found
        train = examples
    else:
        train, val = split_examples(examples, ds.validation_split, ds.split_seed)

    # Duplicates within each file (before the split they would also leak across it).
    pool = examples + (val if ds.validation_path is not None else [])
    seen: dict[str, Example] = {}
    for ex in pool:
        key = conversation_key(ex.messages)
        first = seen.get(key)
        if first is not None:
            issues.append(Issue("duplicate", f"same conversation as {Path(first.file).name}:{first.line}",
                                ex.file, ex.line))
        else:
            seen[key] = ex
    train_prompts = {prompt_key(e.messages): e for e in train}
    for ex in val:
        hit = train_prompts.get(prompt_key(ex.messages))
        if hit is not None and conversation_key(hit.messages) != conversation_key(ex.messages):
            issues.append(Issue("leakage", f"validation prompt also in training data ({Path(hit.file).name}:"
                                f"{hit.line})", ex.file, ex.line, "validation"))
        elif hit is not None and ds.validation_path is not None:
            issues.append(Issue("leakage", f"validation example also in training data ({Path(hit.file).name}:"
                                f"{hit.line})", ex.file, ex.line, "validation"))

    lengths: list[int] = []
    if count_tokens is not None:
        for split, group in (("train", train), ("validation", val)):
            for ex in group:
                ex.tokens = count_tokens(ex.messages)
                lengths.append(ex.tokens)
                if ex.tokens > spec.training.max_length:
                    issues.append(Issue("too_long", f"{ex.tokens} tokens > training.max_length "
                                        f"{spec.training.max_length}", ex.file, ex.line, split))
    if not train:
        issues.append(Issue("too_few", "no valid training examples", str(ds.path)))
    if not val and (ds.validation_path is not None or ds.validation_split > 0):
        issues.append(Issue("too_few", "no validation examples (add data, set validation_split: 0, "
                            "or give validation_path)", str(ds.validation_path or ds.path)))
    stats = ({"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
              "total": sum(lengths)} if lengths else {})
    issues.sort(key=lambda i: (i.file, i.line or 0))
    return DataReport(
        ok=not issues, issues=issues, train_examples=len(train), validation_examples=len(val),
        data_hash=hash_files(files), files=[str(f) for f in files], token_stats=stats, train=train, validation=val,
    )


def check_dataset(spec: JobSpec, count_tokens: Callable[[Messages], int] | None) -> DataReport:
    report = validate_dataset(spec, count_tokens)
    if not report.ok:
        raise InvalidTrainingData(f"refusing to train {spec.name!r}: {report.summary()}", report=report)
    return report


# -- tokenization with prompt masking ------------------------------------------------------------


def assistant_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The full chat text and the character spans of each assistant answer (with its end token).

    Built from prefixes of the conversation, so it works with any chat template that renders
    a conversation as the concatenation of its turns (ChatML, Llama, Mistral...)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template does not render conversations as prefixes of each other; "
                             "prompt masking needs one that does")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_example(tokenizer: Any, messages: Messages) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels; labels are -100 outside assistant answers."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(tok if inside else IGNORE_INDEX)
    return {"input_ids": list(enc["input_ids"]), "attention_mask": [1] * len(labels), "labels": labels}


def token_counter(tokenizer: Any) -> Callable[[Messages], int]:
    def count(messages: Messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count
