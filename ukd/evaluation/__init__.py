"""Evaluation: metrics in millimetres, scoring a split through a predict function, scoring prediction folders, post-processing rules, tables."""
