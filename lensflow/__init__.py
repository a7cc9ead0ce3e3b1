"""lensflow: strong-lens posteriors from flow matching with simulator feedback.

The package is a library of small parts, one module per pipeline stage: ``params`` (the
parameter registry), ``prior``, ``simulator``, ``observation``, ``config``, ``cli``.
"""

__version__ = "0.1.0"

from lensflow.params import NAMES, REGISTRY, ParamSpec
from lensflow.prior import Prior

__all__ = ["NAMES", "REGISTRY", "ParamSpec", "Prior", "__version__"]
