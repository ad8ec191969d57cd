"""The documentation site builds cleanly and the README's links lead somewhere.

`mkdocs build --strict` turns every warning (a broken link or anchor, a page missing from the nav, a docstring
the API reference cannot read) into a failure. Missing mkdocs is a failure too, not a skip: the docs extra is
part of the test setup (`pip install -e .[docs]`, which scripts/setup.sh does).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target), targets without spaces; an optional "title" is not used in README.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def readme_links(text: str) -> list[str]:
    """Relative link targets of a markdown text, outside fenced code blocks, without their #anchors."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_link_finder_sees_links_and_skips_code_and_urls():
    text = "[a](docs/a.md#x) ![p](img.png) [u](https://x.org) [s](#top)\n```\n[c](code.md)\n```\n"
    assert readme_links(text) == ["docs/a.md", "img.png"]


def test_every_relative_link_in_the_readme_points_to_a_file_that_exists():
    links = readme_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(links) >= 10, links  # the feature table alone links every guide
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_mkdocs_builds_the_site_in_strict_mode(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as error:
        pytest.fail(f"mkdocs with its plugins is not installed ({error}): pip install -e .[docs]")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    for page in ("index.html", "distill/index.html", "api/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "fused_kd_loss" in api and "resolve_precision" in api  # the reference was rendered from docstrings
    assert (site / "bench-cpu" / "report.html").is_file()  # the bench reports the pages link to are copied

