"""Image sources, one module per kind: ImageFolder (folder), tfds, label files (label_file: CSV, TSV, JSON lines),
Hugging Face datasets on disk (hf), WebDataset shards (webdataset); all follow :class:`Source` (base). The hf
module imports pyarrow, so it is imported where it is used (``from jaxtl.data.sources.hf import HFSource``)."""

from jaxtl.data.sources.base import ConcatSource, Source, is_multilabel, labels_of, load_image
from jaxtl.data.sources.folder import IMG_EXTENSIONS, ImageFolder, find_classes, image_folder_splits, make_dataset
from jaxtl.data.sources.label_file import LabelFileSource, label_file_splits
from jaxtl.data.sources.tfds import TfdsSource
from jaxtl.data.sources.webdataset import WebDatasetSource

__all__ = [
    "IMG_EXTENSIONS",
    "ConcatSource",
    "ImageFolder",
    "LabelFileSource",
    "Source",
    "TfdsSource",
    "WebDatasetSource",
    "find_classes",
    "image_folder_splits",
    "is_multilabel",
    "label_file_splits",
    "labels_of",
    "load_image",
    "make_dataset",
]
