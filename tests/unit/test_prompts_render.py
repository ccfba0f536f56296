"""Rendering, schema checks and sandbox escapes of prompt templates."""

from __future__ import annotations

import pytest

from app.core.errors import InvalidRequest, KeelError, PayloadTooLarge
from prompts.errors import TemplateInvalid, TemplateRenderError, UnsafeTemplate, VariableError
from prompts.models import TemplateContent, TemplateVersion, VariableSpec, parse_ref, validate_label
from prompts.render import Renderer
from prompts.settings import PromptLimits
from prompts.testing import content


def no_includes(ref: str) -> TemplateVersion:
    raise AssertionError(f"unexpected include {ref}")


def render(c: TemplateContent, variables: dict | None = None, limits: PromptLimits | None = None,
           resolve=no_includes) -> list[str]:
    r = Renderer(limits or PromptLimits())
    compiled = r.compile(c, resolve, version=None, origin="t@draft")
    return [m.content for m in r.render(compiled, variables or {})]


def test_variables_conditionals_loops():
    c = content(
        ("system", "You are {{ persona }}."),
        "{% if docs %}Docs:\n{% for d in docs %}[{{ loop.index }}] {{ d.title }}\n{% endfor %}{% endif %}"
        "Q: {{ question }} (n={{ n + 1 }})",
        variables=[
            {"name": "persona", "default": "a helpful assistant"},
            {"name": "docs", "type": "list", "required": False},
            {"name": "question"},
            {"name": "n", "type": "integer", "default": 0},
        ],
    )
    out = render(c, {"question": "why?", "docs": [{"title": "A"}, {"title": "B"}]})
    assert out == ["You are a helpful assistant.", "Docs:\n[1] A\n[2] B\nQ: why? (n=1)"]
    # optional without default renders as None, so `if docs` works under StrictUndefined
    assert render(c, {"question": "q"})[1] == "Q: q (n=1)"


def test_missing_and_mistyped_variables_are_named():
    c = content("{{ a }} {{ b }}", variables=[{"name": "a"}, {"name": "b", "type": "integer"}])
    with pytest.raises(VariableError, match="missing required variable 'a'") as e:
        render(c, {"b": 1})
    assert e.value.status == 400 and e.value.param == "variables.a"
    with pytest.raises(VariableError, match="'b' must be of type integer, got boolean"):
        render(c, {"a": "x", "b": True})
    with pytest.raises(VariableError, match="'b' must be of type integer, got string"):
        render(c, {"a": "x", "b": "1"})
    with pytest.raises(VariableError, match=r"unknown variable\(s\) zz"):
        render(c, {"a": "x", "b": 1, "zz": 1})


@pytest.mark.parametrize(("kind", "good", "bad"), [
    ("string", "s", 1), ("integer", 3, 3.5), ("number", 3.5, "3"), ("boolean", False, 0),
    ("list", [1], {"a": 1}), ("object", {"a": 1}, [1]),
])
def test_type_checks(kind, good, bad):
    c = content("{{ v }}", variables=[{"name": "v", "type": kind}])
    render(c, {"v": good})
    with pytest.raises(VariableError, match=f"must be of type {kind}"):
        render(c, {"v": bad})


def test_default_must_match_type():
    with pytest.raises(ValueError, match="default of variable 'n' is str, not integer"):
        VariableSpec(name="n", type="integer", default="3")


def test_undeclared_variable_is_refused_at_save():
    r = Renderer(PromptLimits())
    with pytest.raises(TemplateInvalid, match=r"message 2 uses undeclared variable\(s\) extra, other") as e:
        r.check(content("{{ a }}", "{{ other }} {{ extra }} {% for x in a %}{{ x }}{% endfor %}",
                        variables=[{"name": "a"}]), no_includes, origin="t@new")
    assert e.value.param == "messages[1].content"


def test_syntax_error_names_message_and_line():
    with pytest.raises(TemplateInvalid, match="message 1, line 2: Jinja syntax error"):
        Renderer(PromptLimits()).check(content("ok\n{% if %}"), no_includes, origin="t@new")


SSTI = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ x['__class__'] }}",
    "{{ x|attr('__class__') }}",
    "{{ self._TemplateReference__context }}",
    "{{ request.application.__globals__ }}",
    "{% set __keel_loop = x %}{% for i in x %}{% endfor %}",
]


@pytest.mark.parametrize("source", SSTI)
def test_ssti_is_refused_at_save(source):
    with pytest.raises(InvalidRequest) as e:
        Renderer(PromptLimits()).check(content(source, variables=[{"name": "x"}]), no_includes, origin="t@new")
    assert e.value.status == 400
    assert isinstance(e.value, UnsafeTemplate | TemplateInvalid)


@pytest.mark.parametrize(("source", "variables"), [
    ("{{ x|attr(y) }}", {"x": "s", "y": "__class__"}),
    ("{{ x[y] }}", {"x": "s", "y": "__class__"}),
    ("{{ x[y].__name__ if false else x[y] }}", {"x": {}, "y": "__class__"}),
    ("{{ '{0.__class__}'.format(x) }}", {"x": "s", "y": ""}),
    ("{{ x.append(1) }}", {"x": [], "y": ""}),
    ("{{ x.update({'a': 1}) }}", {"x": {}, "y": ""}),
])
def test_sandbox_refuses_dynamic_escapes_at_render(source, variables):
    c = content(source, variables=[{"name": "x", "type": "string"}, {"name": "y"}])
    c = c.model_copy(update={"variables": [
        VariableSpec(name="x", type="object" if isinstance(variables["x"], dict)
                     else "list" if isinstance(variables["x"], list) else "string"),
        VariableSpec(name="y"),
    ]})
    with pytest.raises(KeelError) as e:
        render(c, variables)
    assert e.value.status == 400
    assert isinstance(e.value, UnsafeTemplate | TemplateRenderError)
    assert "object at 0x" not in e.value.message


@pytest.mark.parametrize("source", [
    "{{ 'a' * 1000000000 }}",
    "{{ 10 ** 100000 }}",
    "{{ '%999999999s' % 'x' }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 'x'.center(999999999) }}",
    "{{ 'x'|center(999999999) }}",
    "{{ 'x'|indent(999999999) }}",
    "{{ range(10000000)|list }}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ ('x' * 100000).replace('x', 'yyyyyyyyyy') }}",
])
def test_resource_exhaustion_is_refused(source):
    with pytest.raises(KeelError) as e:
        render(content(source))
    assert e.value.status in (400, 413)


def test_size_and_nesting_limits():
    r = Renderer(PromptLimits(max_message_chars=50, max_template_chars=60, max_nesting=2, max_messages=2))
    with pytest.raises(PayloadTooLarge, match="message 1 has 51 characters"):
        r.check(content("x" * 51), no_includes, origin="t@new")
    with pytest.raises(PayloadTooLarge, match="61 characters in all; the limit is 60"):
        r.check(content("x" * 40, "y" * 21), no_includes, origin="t@new")
    r = Renderer(PromptLimits(max_nesting=2))
    deep = "{% if 1 %}{% if 1 %}{% if 1 %}x{% endif %}{% endif %}{% endif %}"
    with pytest.raises(TemplateInvalid, match="nests blocks 3 deep; the limit is 2"):
        r.check(content(deep), no_includes, origin="t@new")
    # elif chains are not nesting
    r.check(content("{% if 1 %}a{% elif 2 %}b{% elif 3 %}c{% elif 4 %}d{% endif %}"), no_includes,
            origin="t@new")


def test_message_count_limit():
    with pytest.raises(PayloadTooLarge, match="at most 2 messages"):
        Renderer(PromptLimits(max_messages=2)).check(content("a", "b", "c"), no_includes, origin="t@new")


def test_dynamic_include_names_are_refused():
    with pytest.raises(TemplateInvalid, match="include/import names must be literal"):
        Renderer(PromptLimits()).check(content("{% include x %}", variables=[{"name": "x"}]), no_includes,
                                       origin="t@new")


def test_safe_features_still_work():
    c = content(
        "{% set ns = namespace(total=0) %}{% for i in xs %}{% set ns.total = ns.total + i %}{% endfor %}"
        "{{ ns.total }} {{ xs|join(',') }} {{ '%05.1f'|format(3.14159) }} {{ '{:,}'.format(1234567) }} "
        "{{ name|upper }} {{ d.k }} {{ d['k'] }} {{ xs|tojson }}",
        variables=[{"name": "xs", "type": "list"}, {"name": "name"}, {"name": "d", "type": "object"}],
    )
    assert render(c, {"xs": [1, 2, 3], "name": "bo", "d": {"k": "v"}}) == [
        "6 1,2,3 003.1 1,234,567 BO v v [1, 2, 3]"
    ]


def test_refs_and_names():
    assert parse_ref("rag-answer").label == "production"
    assert parse_ref("rag-answer@7").version == 7
    assert parse_ref("rag-answer@v7").version == 7
    assert parse_ref("rag-answer@staging").label == "staging"
    assert parse_ref("rag-answer@latest").label == "latest"
    for bad in ["", "../etc", "Rag", "a/b", "a@", "a@-x", ".hidden", "a" * 65, "a@0"]:
        with pytest.raises(InvalidRequest):
            parse_ref(bad)
    for reserved in ["latest", "7", "v7"]:
        with pytest.raises(InvalidRequest, match="reserved"):
            validate_label(reserved)


def test_content_hash_is_canonical():
    a = content("hi", temperature=0.2)
    b = TemplateContent.model_validate({"params": {"temperature": 0.2}, "messages": [
        {"content": "hi", "role": "user"}], "variables": [], "description": ""})
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != content("hi ", temperature=0.2).content_hash()
    assert a.content_hash().startswith("sha256:") and len(a.content_hash()) == 7 + 64
