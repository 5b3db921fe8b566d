"""The decoded-image cache against torchvision's eval pipeline, on real photographs."""

import numpy as np
import pytest
import skimage.data
import torchvision.transforms as T
from PIL import Image
from torchvision import models
from torchvision.datasets.folder import default_loader

from jaxtl.data import CachedEvalTransform, DecodedCache, ImageFolder, Loader, normalize
from jaxtl.weights import get_weight_spec

# (photograph, scale, transpose): sizes above and below the resize, odd, landscape, portrait, square, grayscale.
PHOTOS = [
    ("astronaut", 1.0, False),
    ("astronaut", 0.37, False),
    ("chelsea", 1.0, False),
    ("chelsea", 1.0, True),
    ("coffee", 0.61, False),
    ("rocket", 1.0, False),
    ("rocket", 0.53, True),
    ("immunohistochemistry", 0.77, False),
    ("camera", 1.0, False),
    ("coins", 0.83, True),
]
WEIGHTS = {  # bilinear and bicubic preprocessing
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V2,
    "efficientnet_b0": models.EfficientNet_B0_Weights.IMAGENET1K_V1,
}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for k, (name, scale, transpose) in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage.data, name)())
        if scale != 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        if transpose:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        folder = root / ("gray" if image.mode == "L" else "color")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{k:02d}_{name}_{image.width}x{image.height}.jpg", quality=90)
    return ImageFolder(root)


@pytest.mark.parametrize("arch", sorted(WEIGHTS))
def test_cached_eval_images_equal_torchvisions_pipeline(photo_folder, arch):
    weights = WEIGHTS[arch]
    theirs = weights.transforms()
    preprocessing = get_weight_spec(arch, weights.name).preprocessing
    assert (preprocessing.resize_size, preprocessing.crop_size) == (theirs.resize_size[0], theirs.crop_size[0])
    assert preprocessing.interpolation == theirs.interpolation.value
    reference = T.Compose(
        [
            T.Resize(theirs.resize_size, theirs.interpolation, antialias=True),
            T.CenterCrop(theirs.crop_size),
            T.PILToTensor(),
        ]
    )
    cached = DecodedCache(budget_bytes=1 << 30).build(photo_folder, preprocessing, num_workers=0)
    transform = CachedEvalTransform(preprocessing)
    expected = []
    for index, (path, label) in enumerate(photo_folder.samples):
        image = default_loader(path)  # torchvision's loader: PIL, .convert("RGB")
        expected.append(reference(image).permute(1, 2, 0).numpy())
        array, cached_label = cached.load(index)
        ours = transform(array)
        assert cached_label == label
        assert np.array_equal(ours, expected[-1]), path
        # Normalised, it is what weights.transforms() gives (C, H, W), transposed.
        normalised = theirs(image).permute(1, 2, 0).numpy()
        assert np.allclose(normalize(ours, preprocessing.mean, preprocessing.std), normalised, rtol=0, atol=1e-6)
    with Loader(cached, transform, batch_size=4, shuffle=False, num_workers=2, worker_type="thread") as loader:
        batches = list(loader.epoch(0))
    images = np.concatenate([b.images[b.mask] for b in batches])
    assert np.array_equal(images, np.stack(expected))
    labels = np.concatenate([b.labels[b.mask] for b in batches])
    assert labels.tolist() == [label for _, label in photo_folder.samples]
