"""Label the demo study's small sphere as a lung nodule and write it as a DICOM-SEG.

Stands in for an annotator's tool (3D Slicer, OHIF, a model) in the README
walk-through: it reads the slices the node served, thresholds the 60 HU sphere
and writes a highdicom SEG referencing them.

    python docs/make_demo_seg.py received/ nodule-seg.dcm
"""

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.sr.coding import Code

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
slices = sorted((dcmread(p) for p in folder.iterdir() if p.is_file()),
                key=lambda ds: float(ds.ImagePositionPatient[2]))
hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
               for ds in slices])
mask = (hu > 55) & (hu < 65)  # the 16 mm sphere of 60 HU
nodule = hd.seg.SegmentDescription(
    segment_number=1,
    segment_label="Lung nodule",
    segmented_property_category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
    segmented_property_type=Code("27925004", "SCT", "Nodule"),
    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
)
seg = hd.seg.Segmentation(
    source_images=slices, pixel_array=mask, segmentation_type="BINARY",
    segment_descriptions=[nodule], series_instance_uid=hd.UID(), series_number=100,
    sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lamina README",
    manufacturer_model_name="make_demo_seg", software_versions="1", device_serial_number="1",
    content_creator_name="Annotator^Demo",
)
seg.save_as(out)
print(f"wrote {out}: {int(mask.sum())} voxels on {int(mask.any(axis=(1, 2)).sum())} slices")
