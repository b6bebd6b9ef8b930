"""The study: every sharing scheme trained on the same data, and its report."""
