"""Lamina: a DICOM node for annotated imaging datasets."""

__version__ = "0.1.0"
