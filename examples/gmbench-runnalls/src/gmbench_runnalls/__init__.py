"""Runnalls' mixture reduction as a gmbench plugin (``reduction: runnalls``)."""

from gmbench_runnalls.plugin import RunnallsReduction

__all__ = ["RunnallsReduction"]
