"""The report as one self-contained HTML page: inline style, figures embedded as PNG data, no
script and nothing fetched when it is opened. Every name and value from the run is escaped."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.sub { color: #666; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 0.25em 0.8em; text-align: left;
         vertical-align: top; }
th { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.92em; }
p.note { color: #666; font-style: italic; }
"""


@dataclass(frozen=True)
class Section:
    """A heading, with text paragraphs, a table and figures (each PNG bytes and a caption)."""

    title: str
    paragraphs: Sequence[str] = ()
    table: tuple[Sequence[str], Sequence[Sequence[str]]] | None = None  # header, rows
    figures: Sequence[tuple[bytes, str]] = ()
    notes: Sequence[str] = ()


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page."""
    body = "\n".join(_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Nothing loads from anywhere: images are inline, there is no script.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="sub">{escape(subtitle)}</p>\n{body}\n'
        "</body></html>\n"
    )


def _section(s: Section) -> str:
    parts = [f"<section><h2>{escape(s.title)}</h2>"]
    parts += [f"<p>{escape(p)}</p>" for p in s.paragraphs]
    if s.table is not None:
        parts.append(_table(*s.table))
    for data, caption in s.figures:
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    parts += [f'<p class="note">{escape(n)}</p>' for n in s.notes]
    parts.append("</section>")
    return "\n".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: str) -> str:
    numeric = value.replace(".", "", 1).replace("-", "", 1).isdigit()
    return f'<td class="num">{escape(value)}</td>' if numeric else f"<td>{escape(value)}</td>"
