"""Markdown -> one self-contained HTML page, for the subset the report writes: headings,
paragraphs, `-` lists, pipe tables (with alignment), fenced code, images on a line of their
own (embedded as base64 data URIs, so the page is a single file), and inline `code`,
**bold**, *emphasis* and [links](url). Everything else is escaped text, never raw HTML."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".svg": "image/svg+xml"}

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f3f5f7; padding: 0 3px; border-radius: 3px; font-size: 90%; }
pre { background: #f3f5f7; padding: .8em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 13px; }
"""

_IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_LIST_ITEM = re.compile(r"^[-*]\s+(.*)$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def render_html(md: str, base_dir: Path | str, title: str = "report") -> str:
    """The page for markdown `md`; image paths are read relative to `base_dir`."""
    body = "\n".join(_blocks(md.splitlines(), Path(base_dir)))
    h1 = re.search(r"^#\s+(.*)$", md, re.MULTILINE)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(h1.group(1) if h1 else title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _blocks(lines: list[str], base: Path):
    i, n = 0, len(lines)
    while i < n:
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, n) if lines[j].startswith("```")), n)
            yield "<pre><code>" + html.escape("\n".join(lines[i + 1 : end])) + "</code></pre>"
            i = end + 1
        elif m := _HEADING.match(line):
            level = len(m.group(1))
            text = m.group(2)
            yield f'<h{level} id="{_slug(text)}">{inline(text)}</h{level}>'
            i += 1
        elif m := _IMAGE_LINE.match(line.strip()):
            yield _figure(m.group(1), m.group(2), base)
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < n and _TABLE_RULE.match(lines[i + 1].strip()):
            end = i + 2
            while end < n and lines[end].lstrip().startswith("|"):
                end += 1
            yield _table(lines[i], lines[i + 1], lines[i + 2 : end])
            i = end
        elif _LIST_ITEM.match(line):
            items = []
            while i < n and (m := _LIST_ITEM.match(lines[i].rstrip())):
                item = [m.group(1)]
                i += 1
                while i < n and lines[i].startswith("  ") and lines[i].strip():  # continuation lines
                    item.append(lines[i].strip())
                    i += 1
                items.append("<li>" + inline(" ".join(item)) + "</li>")
            yield "<ul>\n" + "\n".join(items) + "\n</ul>"
        else:
            para = []
            while i < n and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            yield "<p>" + inline(" ".join(para)) + "</p>"


def _starts_block(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return bool(
        _HEADING.match(s)
        or _LIST_ITEM.match(s)
        or _IMAGE_LINE.match(s)
        or s.startswith("```")
        or (s.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()))
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def _table(header: str, rule: str, rows: list[str]) -> str:
    align = []
    for spec in _cells(rule):
        left, right = spec.startswith(":"), spec.endswith(":")
        align.append("center" if left and right else "right" if right else "left")

    def row_html(cells, tag):
        cells = (cells + [""] * len(align))[: len(align)]
        return (
            "<tr>"
            + "".join(f'<{tag} style="text-align:{a}">{inline(c)}</{tag}>' for c, a in zip(cells, align))
            + "</tr>"
        )

    return (
        "<table>\n<thead>"
        + row_html(_cells(header), "th")
        + "</thead>\n<tbody>\n"
        + "\n".join(row_html(_cells(r), "td") for r in rows)
        + "\n</tbody>\n</table>"
    )


def _figure(alt: str, src: str, base: Path) -> str:
    path = base / src
    mime = MIME.get(path.suffix.lower())
    if re.match(r"^[a-z]+:", src) or mime is None or not path.is_file():
        return f"<p><em>[figure not available: {html.escape(alt)} ({html.escape(src)})]</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(alt, quote=True)}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def inline(text: str) -> str:
    """Inline markdown of one line of text; code spans are taken literally."""
    out = []
    for k, part in enumerate(_CODE.split(text)):
        if k % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        s = html.escape(part, quote=False)
        s = _LINK.sub(
            lambda m: (
                f'<a href="{html.escape(m.group(2), quote=True)}">{m.group(1)}</a>'
                if re.match(r"^(https?:|#|[\w./-]+$)", m.group(2))
                else m.group(0)
            ),
            s,
        )
        s = _BOLD.sub(r"<strong>\1</strong>", s)
        s = _EM.sub(r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)
