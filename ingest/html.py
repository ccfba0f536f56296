"""HTML to structured plain text: main content only, headings kept as markdown ``#`` lines.

Emitting markdown headings lets one structure-aware chunker serve markdown and HTML alike.
selectolax (lexbor) is used rather than a readability-style extractor because documentation
pages are mostly headings, lists and code, which article extractors tend to drop.
"""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser, LexborNode

# Never content, whatever page they are on.
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "iframe", "form", "button", "nav", "header",
              "footer", "aside", "head")
_DROP_SELECTORS = ('[role="navigation"]', '[role="banner"]', '[role="contentinfo"]', '[role="search"]',
                   '[aria-hidden="true"]', '[hidden]')
# Class/id words that mark site chrome (Sphinx, MkDocs, typical CMS themes).
_CHROME = re.compile(
    r"(^|[-_\s])(nav|navbar|navigation|sidebar|sphinxsidebar|related|breadcrumbs?|footer|header|menu|toc|"
    r"cookie|banner|skip|social|share|advert|ads|pagination)($|[-_\s])", re.I)
_MAIN_SELECTORS = ("main", '[role="main"]', "article", "div.body", "div#content", "div.content", "body")
# Inline elements are never site chrome, whatever their class: docutils wraps every heading's text in
# <a class="toc-backref">, which the "toc" word would otherwise remove with the heading.
_INLINE = {"a", "span", "code", "em", "strong", "b", "i", "abbr", "cite", "kbd", "samp", "var", "sup", "sub"}
_BLOCKS = {"p", "li", "pre", "blockquote", "dt", "dd", "td", "th", "caption", "figcaption", "tr"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_WS = re.compile(r"[ \t\u00a0]+")


def html_to_text(html: str) -> tuple[str, str]:
    """Return ``(title, text)``; text has one block per paragraph and ``#`` headings."""
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = _clean(title_node.text()) if title_node else ""
    for tag in _DROP_TAGS:
        for node in tree.css(tag):
            node.decompose()
    for sel in _DROP_SELECTORS:
        for node in tree.css(sel):
            node.decompose()
    for node in tree.css("[class], [id]"):
        attrs = node.attributes
        marker = f"{attrs.get('class') or ''} {attrs.get('id') or ''}"
        if _CHROME.search(marker) and node.tag not in ("body", "main", "article", "html", *_INLINE):
            node.decompose()
    root = None
    for sel in _MAIN_SELECTORS:
        root = tree.css_first(sel)
        if root is not None:
            break
    if root is None:
        return title, ""
    for node in root.css("a.headerlink"):  # Sphinx's pilcrow anchors
        node.decompose()
    blocks: list[str] = []
    _walk(root, blocks)
    text = "\n\n".join(b for b in blocks if b.strip())
    if not title:
        h1 = root.css_first("h1")
        title = _clean(h1.text()) if h1 else ""
    return title, text


def _walk(node: LexborNode, out: list[str]) -> None:
    for child in node.iter(include_text=True):
        tag = child.tag
        if tag == "-text":
            text = _clean(child.text_content or "")
            if text:
                out.append(text)
        elif tag in _HEADINGS:
            text = _clean(child.text(separator=""))
            if text:
                out.append("#" * _HEADINGS[tag] + " " + text)
        elif tag == "pre":
            text = (child.text(separator="") or "").strip("\n")
            if text.strip():
                # Fenced, so that a "# comment" line in a code sample is not taken for a heading.
                out.append("```\n" + text.replace("```", "'''") + "\n```")
        elif tag in _BLOCKS and not _has_block_child(child):
            text = _clean(child.text(separator=""))
            if text:
                out.append(text)
        elif tag in ("br", "hr", "img", "-comment"):
            continue
        elif _has_block_child(child):
            _walk(child, out)
        else:
            text = _clean(child.text(separator=""))
            if text:
                out.append(text)


def _has_block_child(node: LexborNode) -> bool:
    for sub in node.iter(include_text=False):
        if sub.tag in _BLOCKS or sub.tag in _HEADINGS or sub.tag in ("div", "section", "ul", "ol", "dl", "table",
                                                                     "tbody", "thead", "article", "main"):
            return True
    return False


def _clean(text: str) -> str:
    return _WS.sub(" ", text.replace("\n", " ")).strip()
