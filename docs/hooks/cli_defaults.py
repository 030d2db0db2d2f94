"""MkDocs hook: click ≥ 8.2 marks an option without a default by a sentinel, which mkdocs-click prints as
`Sentinel.UNSET`; the CLI reference shows an empty default there instead, as `--help` does."""

from __future__ import annotations


def on_page_content(html: str, page, config, files) -> str:
    return html.replace("Sentinel.UNSET", "") if page.file.src_uri == "cli.md" else html
