"""One report, two renderings: markdown with linked PNGs and self-contained HTML.

A report is a title, a few "key: value" details and a list of `Section`s (heading, caption,
optional table, optional figure). `render_markdown` links figures by path relative to the
markdown file; `render_html` embeds them as base64 `data:` URIs with inline CSS, so the
HTML file can be mailed or attached on its own: it loads nothing from anywhere.
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from cldist.report.summary import render_markdown_table


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    heading: str
    caption: str = ""
    table: Table | None = None
    figure: Path | None = None
    # Tables that only help in the markdown (e.g. a small matrix grid already in the figure).
    extra_tables: list[Table] = field(default_factory=list)


@dataclass
class Document:
    title: str
    details: list[tuple[str, str]]
    sections: list[Section]


def render_markdown(document: Document, markdown_dir: Path) -> str:
    """Markdown text; figure links are relative to `markdown_dir` (where the .md file goes)."""
    lines = [f"# {document.title}", ""]
    if document.details:
        lines += [f"- {key}: {value}" for key, value in document.details] + [""]
    for section in document.sections:
        lines += [f"## {section.heading}", ""]
        if section.caption:
            lines += [section.caption, ""]
        if section.table is not None:
            lines += [render_markdown_table(section.table.headers, section.table.rows), ""]
        if section.figure is not None:
            relative = os.path.relpath(section.figure, markdown_dir).replace(os.sep, "/")
            lines += [f"![{section.heading}]({relative})", ""]
        for table in section.extra_tables:
            lines += [render_markdown_table(table.headers, table.rows), ""]
    return "\n".join(lines)


def png_data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


# Inline stylesheet: readable on screen and in print, no web fonts or external assets.
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
ul.details { list-style: none; padding: 0; color: #555; }
ul.details li { display: inline-block; margin-right: 1.5em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
p.caption { color: #444; }
"""


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(document: Document) -> str:
    """A standalone HTML page; every figure is embedded, nothing is fetched."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(document.title)}</title>", f"<style>{_CSS}</style>",
             "</head>", "<body>", f"<h1>{html.escape(document.title)}</h1>"]
    if document.details:
        items = "".join(f"<li><b>{html.escape(key)}</b>: {html.escape(str(value))}</li>"
                        for key, value in document.details)
        parts.append(f'<ul class="details">{items}</ul>')
    for section in document.sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.caption:
            parts.append(f'<p class="caption">{html.escape(section.caption)}</p>')
        if section.table is not None:
            parts.append(_html_table(section.table))
        if section.figure is not None:
            parts.append(f'<figure><img alt="{html.escape(section.heading)}" '
                         f'src="{png_data_uri(section.figure)}"></figure>')
        for table in section.extra_tables:
            parts.append(_html_table(table))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
