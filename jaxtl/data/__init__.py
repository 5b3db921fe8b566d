"""Data: image sources (ImageFolder, tfds, label files, Hugging Face, WebDataset, synthetic), torchvision-exact
transforms, the loader and its class-balanced sampler, the decoded cache."""

from jaxtl.data.cache import DecodedCache, cache_key
from jaxtl.data.cached_source import CachedEvalTransform, CachedSource, CachedTrainTransform
from jaxtl.data.loader import (
    Batch,
    Loader,
    LoaderState,
    SourceOrder,
    data_sharding,
    device_batches,
    even_batch_size,
)
from jaxtl.data.samplers import ClassBalancedSampler
from jaxtl.data.sources import (
    IMG_EXTENSIONS,
    ConcatSource,
    ImageFolder,
    LabelFileSource,
    TfdsSource,
    WebDatasetSource,
    image_folder_splits,
    is_multilabel,
    label_file_splits,
    labels_of,
    load_image,
)
from jaxtl.data.synthetic import generate_synthetic
from jaxtl.data.transforms import EvalTransform, TrainTransform, normalize

__all__ = [
    "IMG_EXTENSIONS",
    "Batch",
    "CachedEvalTransform",
    "CachedSource",
    "CachedTrainTransform",
    "ClassBalancedSampler",
    "ConcatSource",
    "DecodedCache",
    "EvalTransform",
    "ImageFolder",
    "LabelFileSource",
    "Loader",
    "LoaderState",
    "SourceOrder",
    "TfdsSource",
    "TrainTransform",
    "WebDatasetSource",
    "cache_key",
    "data_sharding",
    "device_batches",
    "even_batch_size",
    "generate_synthetic",
    "image_folder_splits",
    "is_multilabel",
    "label_file_splits",
    "labels_of",
    "load_image",
    "normalize",
]
