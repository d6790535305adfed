"""A report as sections of text, tables and figures, rendered to one HTML file and to markdown.

The HTML is self-contained (figures are base64 PNGs, the style sheet is inline), so it can be
mailed, attached to an MLflow run or opened from disk. The markdown carries the same text and
tables and links the PNGs written beside it.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Text:
    text: str
    emphasis: bool = False  # the verdict lines: shown bold and boxed


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file name stem of the PNG beside the markdown
    png: bytes
    caption: str


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Text | Table | Figure] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]


def cell(value: Any) -> str:
    """Numbers to 4 significant decimals; NaN and None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } .subtitle { color: #555; margin-top: 0; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
.verdict { font-size: 1.12em; font-weight: 600; background: #f5f9ff; border-left: 4px solid #1f77b4;
           padding: 0.5em 0.8em; margin: 0.6em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; } nav a { margin-right: 0.9em; }
"""


def to_html(doc: Document) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
        f'<p class="subtitle">{html.escape(doc.subtitle)}</p>',
        "<nav>" + "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in doc.sections) + "</nav>",
    ]
    for s in doc.sections:
        out.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Text):
                cls = ' class="verdict"' if b.emphasis else ""
                out.append(f"<p{cls}>{html.escape(b.text)}</p>")
            elif isinstance(b, Table):
                out.append("<table>")
                if b.caption:
                    out.append(f"<caption>{html.escape(b.caption)}</caption>")
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in b.columns) + "</tr>")
                for r in b.rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in r) + "</tr>")
                out.append("</table>")
            else:
                data = base64.b64encode(b.png).decode()
                out.append(
                    f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
                )
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(value: Any) -> str:
    return cell(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, figure_dir: str = "plots") -> str:
    """Markdown of ``doc``; figures are linked as ``{figure_dir}/{name}.png``."""
    out = [f"# {doc.title}", "", f"_{doc.subtitle}_", ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                out += [f"**{b.text}**" if b.emphasis else b.text, ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                out.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
                out.append("|" + "|".join("---" for _ in b.columns) + "|")
                out += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in b.rows]
                out.append("")
            else:
                out += [f"![{b.caption}]({figure_dir}/{b.name}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(out)


def figures(doc: Document) -> list[Figure]:
    return [b for s in doc.sections for b in s.blocks if isinstance(b, Figure)]
