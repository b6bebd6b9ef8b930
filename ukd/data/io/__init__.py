"""Reading and writing scans: NIfTI volumes, DICOM series, DICOM-SEG."""
