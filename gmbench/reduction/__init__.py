"""Mixture reduction plugins: ``mem`` (modified EM) and ``treehem`` (paper Appendix D)."""
