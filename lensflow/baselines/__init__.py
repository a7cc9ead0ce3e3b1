"""Baselines: lensflow's lens model run through other codes, for parity checks and comparison.

``lenstronomy`` holds the translation to lenstronomy's keyword lists and its image model. It
is the only place that imports lenstronomy (the ``baselines`` extra); import it explicitly,
``from lensflow.baselines.lenstronomy import to_lenstronomy``, so that lensflow itself never
needs the extra.
"""

__all__: list[str] = []
