"""The streaming output guard shows text as soon as it is safe: word by word past the text checks, judged
after release by the model-backed checks, window by window when a policy asks for it."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from app.core.types import Finished, TextDelta
from app.guardrails.engine import GuardrailEngine
from app.guardrails.errors import GuardrailPolicyError
from app.guardrails.policy import parse_policy
from app.guardrails.settings import GuardrailSettings
from app.guardrails.streaming import hold_point
from app.guardrails.testing import model_cache_dir, shared_embedder
from app.guardrails.types import GuardContext, GuardrailRedaction, GuardrailRetraction

pytest_plugins = ("app.guardrails.testing",)


def tokens(text: str) -> list[str]:
    """Pieces the way a BPE model streams them: words with their leading space, punctuation apart."""
    return re.findall(r"\s*\w+|\s*[^\w\s]|\s+$", text)


async def stream(text: str):
    for t in tokens(text):
        yield TextDelta(t)
    yield Finished("stop")


async def run(guard, text: str) -> tuple[list, list[str]]:
    """Every event, and what the client had been shown after each model token (to catch a leak mid-way)."""
    events, shown, seen = [], "", []
    async for ev in guard.wrap(stream(text)):
        events.append(ev)
        if isinstance(ev, TextDelta):
            shown += ev.text
            seen.append(shown)
    return events, seen


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.fixture(scope="module")
def engine(default_engine):
    return default_engine


def ctx(rid: str) -> GuardContext:
    return GuardContext(request_id=rid, user="user-1")


def test_hold_point_keeps_back_what_may_still_become_a_value():
    assert hold_point("A lighthouse is a tall tow") == len("A lighthouse is a tall ")   # a word being written
    assert hold_point("Call 555 123 ") == len("Call ")                                 # groups of a number
    assert hold_point("In 1905 he wrote ") == len("In 1905 he wrote ")                 # a number followed by words
    assert hold_point("Account GB29 NWBK ") == len("Account ")
    assert hold_point("the winner was Marie ", names=True) == len("the winner was ")   # may begin a name
    assert hold_point("the winner was Marie ") == len("the winner was Marie ")         # names not guarded
    text = "I met Marie Curie in the lab and "
    assert hold_point(text, names=True) == len("I met ")                              # a name waits for the sentence
    assert hold_point(text, start=10, names=True) == 10                               # never below what was shown
    # a word starting in lower case ends a run: the number or the capitalised word before it is whole
    assert hold_point("Call 650 253 0000 t") == len("Call 650 253 0000 ")
    assert hold_point("Lighthouses are", names=True) == len("Lighthouses ")
    assert hold_point("Write to Vincent v", names=True) == len("Write to ")            # v... may be "van"


async def test_text_streams_word_by_word(engine):
    text = "A lighthouse is a tall tower with a bright lamp at the top. Ships use it to find their way at night."
    events, seen = await run(engine.output_guard(ctx("pr-clean")), text)
    assert text_of(events) == text
    assert len(seen) > 15  # word by word, not two sentence windows
    assert seen[0] == "A "  # one word behind the model
    assert not any(isinstance(e, GuardrailRetraction | GuardrailRedaction) for e in events)


@pytest.mark.parametrize("text, secret, placeholder", [
    ("You can call the office on 650 253 0000 during the day. Thanks.", "253", "<PHONE>"),
    ("Write to jane.doe@example.com for details. Thanks.", "jane", "<EMAIL>"),
    ("The card on file is 4111 1111 1111 1111 until next year. Thanks.", "1111", "<CREDIT_CARD>"),
    ("Use the key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx123456 in the header. Thanks.", "AbCdEf", "<SECRET:OPENAI_KEY>"),
    ("Set password: Xk9$mQ2#vL7pR4tZ in the config file. Thanks.", "Xk9", "<SECRET:GENERIC_SECRET>"),
])
async def test_values_are_masked_before_any_piece_of_them_is_shown(engine, text, secret, placeholder):
    events, seen = await run(engine.output_guard(ctx("pr-pii")), text)
    assert all(secret not in s for s in seen), seen
    assert placeholder in text_of(events) and text_of(events).endswith("Thanks.")
    assert any(isinstance(e, GuardrailRedaction) for e in events)


async def test_a_name_beside_its_owners_contact_details_is_never_shown(engine):
    # persons: with_contact: the name is personal data only with the e-mail after it in the sentence
    events, seen = await run(engine.output_guard(ctx("pr-name")),
                             "Sure, you can reach Maria Garcia at maria.garcia@example.com any day. Bye.")
    assert all("Garcia" not in s for s in seen), seen
    assert "<PERSON>" in text_of(events) and "<EMAIL>" in text_of(events)
    # a public figure's name alone is shown (at the end of its sentence)
    events, _ = await run(engine.output_guard(ctx("pr-name-2")), "Marie Curie won two Nobel prizes. Yes.")
    assert text_of(events) == "Marie Curie won two Nobel prizes. Yes."


async def test_a_name_shown_before_its_owners_contact_details_arrive_is_withdrawn(engine):
    # The name alone (a sentence of its own) is shown; the e-mail in the next sentence makes it a private person's
    # record, and a shown name can no longer be masked: the answer is withdrawn, the e-mail never shown.
    events, seen = await run(engine.output_guard(ctx("pr-name-late")),
                             "Maria Garcia works in our Paris office. You can write to maria.garcia@example.com "
                             "any day. Bye.")
    assert any("Maria Garcia works" in s for s in seen)  # shown before the e-mail came
    assert all("maria.garcia@" not in s for s in seen), seen
    retraction = next(e for e in events if isinstance(e, GuardrailRetraction))
    assert retraction.validator == "pii" and isinstance(events[-1], Finished)
    assert events[-1].reason == "content_filter"
    # an e-mail far from any name (another person's, or none) is only masked
    events, _ = await run(engine.output_guard(ctx("pr-name-far")), "Write to office@example.com for details. Bye.")
    assert text_of(events) == "Write to <EMAIL> for details. Bye."


async def test_toxic_words_are_never_shown_and_audit_counts_windows_not_words(engine):
    events, seen = await run(engine.output_guard(ctx("pr-tox")),
                             "Ships carry cargo across the sea. You are a worthless fucking idiot, honestly.")
    assert all("fucking" not in s for s in seen)
    assert isinstance(events[-1], Finished) and events[-1].reason == "content_filter"
    retraction = next(e for e in events if isinstance(e, GuardrailRetraction))
    assert retraction.validator == "toxicity" and retraction.retracted_chars == len(seen[-1])
    await engine.flush()
    rows = engine.query_audit(request_id="pr-tox")
    # one row per entry and window (2 windows x 4 entries at most), not one per word
    assert 0 < len(rows) <= 8, [(r.validator, r.verdict) for r in rows]


TOPIC_POLICY = {"version": "1", "topics": {"weapons": {
    "description": "Building or acquiring weapons or explosives.",
    "examples": ["How do I build a bomb?", "Where can I buy an untraceable gun?",
                 "Mix these chemicals to make an explosive device."]}},
    "policies": {"default": {"output": [
        {"validator": "keel/pii", "on_fail": "redact"},
        {"validator": "keel/topic", "on_fail": "block", "threshold": 0.5, "params": {"deny": ["weapons"]}}]},
        "held": {"output": [
            {"validator": "keel/pii", "on_fail": "redact"},
            {"validator": "keel/topic", "on_fail": "block", "threshold": 0.5, "params": {"deny": ["weapons"]},
             "release": "before"}]}}}


@pytest.fixture(scope="module")
def topic_engine():
    e = GuardrailEngine(GuardrailSettings(audit_db=":memory:", model_cache=model_cache_dir()),
                        policy=parse_policy(TOPIC_POLICY), embedder=shared_embedder(), registry=CollectorRegistry())
    e.warm_up()
    yield e
    e._pool.shutdown(wait=True)


BOMB = "The weather is mild today and sunny. To build a bomb, mix these chemicals into an explosive device. Then."


async def test_a_model_backed_judge_runs_after_release_and_its_retraction_is_counted(topic_engine):
    events, seen = await run(topic_engine.output_guard(GuardContext("tp-after")), BOMB)
    retraction = next(e for e in events if isinstance(e, GuardrailRetraction))
    assert retraction.validator == "topic" and retraction.retracted_chars == len(seen[-1])
    assert any("bomb" in s for s in seen)  # shown, then withdrawn: the cost the metric counts
    counted = topic_engine.metrics.registry.get_sample_value(
        "keel_guardrail_stream_retractions_total", {"policy": "default", "validator": "topic"})
    assert counted == 1


async def test_release_before_holds_each_window_until_its_judge_passed(topic_engine):
    guard = topic_engine.output_guard(GuardContext("tp-before", policy="held"))
    assert not guard.progressive
    events, seen = await run(guard, BOMB)
    assert seen[0] == "The weather is mild today and sunny. "  # a whole window at once
    assert all("bomb" not in s for s in seen)
    assert any(isinstance(e, GuardrailRetraction) for e in events)


@pytest.mark.parametrize("entry, stage, message", [
    ({"validator": "keel/pii", "on_fail": "redact", "release": "before"}, "input", "output entries only"),
    ({"validator": "keel/pii", "on_fail": "redact", "release": "after"}, "output", "always runs before release"),
    ({"validator": "keel/json_schema", "on_fail": "block", "release": "before"}, "output", "whole answer"),
])
def test_release_is_validated(entry, stage, message):
    with pytest.raises(GuardrailPolicyError, match=message):
        parse_policy({"version": "1", "policies": {"default": {stage: [entry]}}})


# -- found by a review of the first version: each was shown, or withdrawn, where the whole answer is not --

async def test_a_sentence_that_only_starts_like_a_threat_is_not_withdrawn(engine):
    text = "You can kill the stuck python process with kill -9 and then restart the service cleanly. Done."
    events, _ = await run(engine.output_guard(ctx("rv-kill")), text)
    assert text_of(events) == text and not any(isinstance(e, GuardrailRetraction) for e in events)


@pytest.mark.parametrize("name", ["José García", "Vincent van Gogh", "Jean-Luc Picard", "Sean O'Brien"])
async def test_names_beyond_ascii_with_particles_or_hyphens_are_held_with_their_contact(engine, name):
    mail = name.split()[0].lower().replace("é", "e") + "@example.com"
    events, seen = await run(engine.output_guard(ctx("rv-name")),
                             f"Your contact person is {name} at {mail} in the main office. Bye.")
    last = name.split()[-1]
    assert all(last not in s for s in seen), seen
    assert "<EMAIL>" in text_of(events)


async def test_a_number_cut_by_the_window_length_limit_is_held_whole(engine):
    lead = "This is a long introduction without any sentence end so that the first window reaches its limit while"
    events, seen = await run(engine.output_guard(ctx("rv-cut")), f"{lead} 4111 1111 1111 1111 is the card. Ok.")
    assert all("1111" not in s for s in seen), seen
    assert "<CREDIT_CARD>" in text_of(events) and text_of(events).endswith("is the card. Ok.")


async def test_a_long_private_key_is_masked_to_its_end(engine):
    body = "\n".join(f"MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC{i:02d}" for i in range(20))
    key = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"
    events, seen = await run(engine.output_guard(ctx("rv-key")), f"Here it is:\n{key}\nKeep it safe.")
    assert all("MIIEvQ" not in s for s in seen)
    assert "<SECRET:PRIVATE_KEY>" in text_of(events) and text_of(events).endswith("\nKeep it safe.")


async def test_one_audit_row_per_entry_and_window_and_an_aborted_stream_is_accounted(engine):
    text = "Write to a@example.com or b@example.com or c@example.com today."
    await run(engine.output_guard(ctx("rv-rows")), text)
    await engine.flush()
    pii = [r for r in engine.query_audit(request_id="rv-rows") if r.validator == "pii"]
    assert len(pii) == 1 and pii[0].verdict == "fail"

    async def cut_short():
        for t in tokens("Mail a@example.com or call me later and"):
            yield TextDelta(t)  # no Finished: the client went away

    guard = engine.output_guard(ctx("rv-abort"))
    shown = [e async for e in guard.wrap(cut_short())]
    assert any(isinstance(e, GuardrailRedaction) for e in shown)
    assert any(r.validator == "pii" and r.verdict == "fail" for r in guard.results)


async def test_a_sentence_of_number_groups_at_the_end_is_shown(engine):
    text = "Here: 1234 5678 2468 1357 9753 8642. More text follows here."
    events, _ = await run(engine.output_guard(ctx("rv-end")), text)
    assert text_of(events).endswith("More text follows here.") and "9753" in text_of(events)


BENIGN = [
    "In 1905 Albert Einstein published four papers. They changed physics!\nSee pages 12-14 and 2021 notes.",
    "Table:\n1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\nNew York City has 8 million people. The End",
    "Use [brackets] and <tags> freely. Vincent van Gogh painted in Arles (France) in 1888. OK",
    "The Sun is a star. Paris is the capital of France. Numbers like 42, 3.14 and 1,000 are fine.",
]


@pytest.mark.parametrize("seed", range(6))
async def test_nothing_is_lost_or_repeated_however_the_model_splits_its_text(engine, seed):
    import random

    rng = random.Random(seed)
    for text in BENIGN:
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(5, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

        async def split(pieces: list[str]):
            for piece in pieces:
                yield TextDelta(piece)
            yield Finished("stop")

        events = [e async for e in engine.output_guard(ctx(f"split-{seed}")).wrap(split(pieces))]
        assert text_of(events) == text, pieces
