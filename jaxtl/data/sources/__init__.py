"""Image sources, one module per kind: ImageFolder (folder), tfds; all follow :class:`Source` (base)."""

from jaxtl.data.sources.base import ConcatSource, Source, is_multilabel, labels_of, load_image
from jaxtl.data.sources.folder import IMG_EXTENSIONS, ImageFolder, find_classes, image_folder_splits, make_dataset
from jaxtl.data.sources.tfds import TfdsSource

__all__ = [
    "IMG_EXTENSIONS",
    "ConcatSource",
    "ImageFolder",
    "Source",
    "TfdsSource",
    "find_classes",
    "image_folder_splits",
    "is_multilabel",
    "labels_of",
    "load_image",
    "make_dataset",
]
