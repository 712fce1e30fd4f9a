"""Fetch a task's image from wherever its reference points, and decode it to RGB within limits.

`fetch` is the policy (which references are trusted, with which credentials, up to which size),
`decode` turns bytes into pixels (Pillow's formats, the ultrasound crop), `dicom` reads DICOM,
`modes` converts any pixel mode to 8-bit RGB, and `errors` holds `ImageError`: every failure
carries a short reason code and the HTTP status our API should answer with. Callers import from
here.
"""

from echolabel.images.decode import UltrasoundCrop, decode_image
from echolabel.images.dicom import DicomFrame, silence_pydicom
from echolabel.images.errors import ImageError, ImageErrorReason
from echolabel.images.fetch import ImageFetcher
from echolabel.images.modes import to_rgb

__all__ = [
    "DicomFrame",
    "ImageError",
    "ImageErrorReason",
    "ImageFetcher",
    "UltrasoundCrop",
    "decode_image",
    "silence_pydicom",
    "to_rgb",
]
