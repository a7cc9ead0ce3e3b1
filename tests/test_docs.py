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


def test_training_priors_table_is_current():
    from lensflow.docs_table import priors_markdown

    table = priors_markdown()
    assert "| `shear_gamma1` | uniform | [-0.1, 0.1] | [-0.25, 0.25] | [-0.5, 0.5] |" in table
    assert "`lens_theta_e`" in table  # the wide prior opens it (the broad one does not)
    text = (DOCS / "training.md").read_text()
    assert table in text, "regenerate with: python -m lensflow.docs_table priors"
