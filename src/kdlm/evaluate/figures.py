"""Pieces the HTML reports share (`kdlm bench`, `kdlm analyze`): a matplotlib figure as PNG bytes, a markdown
table as an HTML table."""

from __future__ import annotations

import html
import io


def figure_png(figure) -> bytes:
    """The figure as PNG bytes (100 dpi, tight bounding box)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def markdown_to_html_table(markdown: str) -> str:
    """The `|`-rows of a markdown table as an HTML <table> (the header row as <th>, bold marks dropped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    out = ["<table>"]
    for index, line in enumerate(lines):
        if index == 1:
            continue
        cells = [html.escape(cell.strip()).replace("**", "") for cell in line.strip("|").split("|")]
        tag = "th" if index == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{cell}</{tag}>" for cell in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)
