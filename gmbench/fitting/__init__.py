"""Transfer-function (ReLU) fitting plugins: ``dense`` (Eq. 6-7) and ``lstsq`` (Appendix B)."""
