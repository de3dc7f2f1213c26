"""The README's test-figure tables are the ones tests/figures/render_readme.py makes from
tests/figures/*.json: a figure changed in one place and not the other fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FIGURES = Path(__file__).parent / "figures"


def test_readme_tables_match_recorded_figures() -> None:
    spec = importlib.util.spec_from_file_location("render_readme",
                                                  FIGURES / "render_readme.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.README.read_text()
    assert "FIGURES:reliability:START" in text and "FIGURES:load:START" in text
    assert mod.render(text) == text, (
        "README.md's figure tables differ from tests/figures/*.json: run "
        ".venv/bin/python tests/figures/render_readme.py and commit both")
