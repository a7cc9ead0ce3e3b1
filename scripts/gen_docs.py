"""Regenerate the generated parts of the docs: docs/cli.md (whole file) and the registry table.

python scripts/gen_docs.py
"""

from pathlib import Path

from lensflow.docs_table import cli_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"

HEADER = """# Command-line reference

Every command prints a one-line `lensflow: error: ...` and exits with status 2 on a user
mistake (missing or unreadable file, wrong column, unknown preset, bad option), never a
traceback. `lensflow COMMAND --help` prints the same information as this page.

"""

if __name__ == "__main__":
    (DOCS / "cli.md").write_text(HEADER + cli_markdown())
    print(f"wrote {DOCS / 'cli.md'}")
