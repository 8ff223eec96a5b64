"""Annotations in: DICOM-SEG and Horos/OsiriX overlay copies, as masks on the source grid."""
