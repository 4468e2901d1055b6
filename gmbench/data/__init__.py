"""Data sets (plugins of kind ``dataset``) and the record type they produce."""

from gmbench.data.records import PointSetSplit

__all__ = ["PointSetSplit"]
