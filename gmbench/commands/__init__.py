"""Sub-commands of the ``gmbench`` CLI, one module each (see :mod:`gmbench.cli`)."""
