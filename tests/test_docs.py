"""Documentation generated from code stays in sync with it."""

from pathlib import Path

from lensflow.docs_table import registry_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_conventions_registry_table_is_current():
    text = (DOCS / "conventions.md").read_text()
    assert registry_markdown() in text, "regenerate with: python -m lensflow.docs_table"


def test_cli_reference_is_current():
    from lensflow.docs_table import cli_markdown

    text = (DOCS / "cli.md").read_text()
    assert cli_markdown() in text, "regenerate with: python scripts/gen_docs.py"
