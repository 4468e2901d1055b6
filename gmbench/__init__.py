"""gmbench: a benchmark suite for Gaussian Mixture Convolution Networks.

The mixture tensor layout is defined in :mod:`gmbench.mixture`; every method is
a pluggy plugin (:mod:`gmbench.hookspecs`, :mod:`gmbench.plugins`).
"""

__version__ = "0.1.0"

from gmbench.errors import GmbenchError  # noqa: E402

__all__ = ["GmbenchError", "__version__"]
