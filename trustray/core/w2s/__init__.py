"""Weak-to-strong supervision (Burns et al. 2023): losses, the split protocol, classifiers and PGR; plain torch."""
