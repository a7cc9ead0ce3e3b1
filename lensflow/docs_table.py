"""The registry as a Markdown table, for docs/conventions.md (generated, never hand-written).

``python -m lensflow.docs_table`` prints the table; tests/test_docs.py checks that
docs/conventions.md contains exactly this text.
"""

from __future__ import annotations

from collections.abc import Sequence

from lensflow.params import REGISTRY, ParamSpec

__all__ = ["registry_markdown"]


def registry_markdown(specs: Sequence[ParamSpec] = REGISTRY) -> str:
    """Render the parameter registry as a Markdown table.

    Args:
        specs: The parameter registry.

    Returns:
        Markdown text, one row per parameter: name, unit, physical bounds, default prior,
        caustics and lenstronomy names.
    """
    rows = [
        "| # | name | unit | physical bounds | default prior | caustics | lenstronomy |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(specs):
        unit = p.unit or "(dimensionless)"
        rows.append(
            f"| {i} | `{p.name}` | {unit} | ({p.low:g}, {p.high:g}) | "
            f"{p.prior}({p.prior_low:g}, {p.prior_high:g}) | `{p.caustics}` | "
            f"`{p.lenstronomy}` |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(registry_markdown(), end="")
