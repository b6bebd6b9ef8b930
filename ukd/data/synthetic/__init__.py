"""Synthetic data: CT and MR phantoms written in the real datasets' layouts and label codes, and DICOM series of them."""
