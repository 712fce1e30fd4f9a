"""Fetch a task's image from wherever its reference points, and decode it to RGB within limits.

A reference is trusted only as far as the settings allow: Label Studio's own URLs get its token,
hosts in ECHOLABEL_IMAGE_ALLOWED_HOSTS are fetched without credentials, local paths are read
only inside ECHOLABEL_LOCAL_FILES_ROOT, and everything else is refused. Every failure is an
`ImageError` carrying a short reason code and the HTTP status our API should answer with.
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
