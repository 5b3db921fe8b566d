"""jaxtl's data pipeline against torchvision's on the same files and PIL images."""

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.datasets import ImageFolder as TorchImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS as TORCH_IMG_EXTENSIONS
from torchvision.datasets.folder import default_loader

import jaxtl.models
from jaxtl import weights
from jaxtl.data import IMG_EXTENSIONS, EvalTransform, ImageFolder, TrainTransform, load_image
from jaxtl.weights import Preprocessing

AWKWARD_CLASSES = ["10", "2", "Zebra", "apple", "Apple", "café", "日本", "a b", "_x", ".hidden", "z-1"]


def write_image(path, size, seed, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def test_extension_list_is_torchvisions():
    assert IMG_EXTENSIONS == TORCH_IMG_EXTENSIONS


def test_class_to_idx_and_samples_equal_torchvisions(tmp_path):
    for k, name in enumerate(AWKWARD_CLASSES):
        write_image(tmp_path / name / f"img{k}.png", (20, 16), k)
        write_image(tmp_path / name / "nested" / "deeper" / "B.JPG", (18, 16), k + 100)
        write_image(tmp_path / name / "a.Jpeg", (16, 18), k + 200)
        (tmp_path / name / "notes.txt").write_text("not an image")
        (tmp_path / name / "image.gif").write_bytes(b"GIF89a")  # not in torchvision's list
    ours, theirs = ImageFolder(tmp_path), TorchImageFolder(str(tmp_path))
    assert ours.class_to_idx == theirs.class_to_idx
    assert list(ours.classes) == theirs.classes
    assert ours.samples == theirs.samples
    assert len(ours) == 3 * len(AWKWARD_CLASSES)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "I", "F", "LA", "1"])
def test_image_modes_load_as_torchvision_loads_them(tmp_path, mode):
    path = tmp_path / ("image.tiff" if mode in ("CMYK", "I;16", "I", "F") else "image.png")
    write_image(path, (33, 21), 0, mode)
    ours = np.asarray(load_image(str(path)))
    theirs = np.asarray(default_loader(str(path)))
    assert ours.shape == (21, 33, 3)
    assert np.array_equal(ours, theirs)


def test_sixteen_bit_png_loads_as_torchvision_loads_it(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (12, 17), dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(default_loader(str(path))))


def test_images():
    """PIL images of awkward sizes: odd, portrait, landscape, smaller than the crop, already crop-sized."""
    sizes = [(333, 251), (251, 333), (500, 375), (224, 224), (180, 120), (232, 232), (1001, 67)]
    rng = np.random.default_rng(0)
    images = []
    for w, h in sizes:
        smooth = np.cumsum(rng.normal(0, 12, (h, w, 3)), axis=1)
        images.append(Image.fromarray(np.clip(128 + smooth - smooth.mean(), 0, 255).astype(np.uint8)))
    return images


IMAGES = test_images()
del test_images
WEIGHT_NAMES = [(arch, name) for arch in jaxtl.models.list_models() for name in weights.list_weights(arch)]


@pytest.mark.parametrize("arch, name", WEIGHT_NAMES, ids=[f"{a}.{n}" for a, n in WEIGHT_NAMES])
def test_eval_transform_equals_weights_transforms(arch, name):
    spec = weights.get_weight_spec(arch, name)
    reference = torchvision.models.get_model_weights(arch)[name].transforms()
    ours = EvalTransform(spec.preprocessing)
    for image in IMAGES:
        expected = reference(image).numpy().transpose(1, 2, 0)
        actual = ours.normalized(image)
        assert actual.shape == expected.shape and actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0, err_msg=f"{arch}.{name} on {image.size}")


def test_random_resized_crop_and_flip_equal_torchvisions_for_the_same_draws():
    preprocessing = Preprocessing(resize_size=256, crop_size=224, interpolation="bicubic")
    transform = TrainTransform(preprocessing, random_resized_crop=True, flip_p=0.5)
    from jaxtl.data.transforms import random_resized_crop_params

    for seed, image in enumerate(IMAGES):
        draws = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(image.height, image.width, transform.scale, transform.ratio, draws)
        flip = draws.random() < 0.5
        expected = F.resized_crop(image, top, left, h, w, [224, 224], F.InterpolationMode.BICUBIC)
        if flip:
            expected = F.hflip(expected)
        actual = transform(image, np.random.default_rng(seed))
        assert np.array_equal(actual, np.asarray(expected)), (seed, top, left, h, w, flip)


def test_loader_batches_equal_a_torch_dataloader_over_the_same_indices(tmp_path):
    from jaxtl.data import Loader, generate_synthetic

    root = generate_synthetic(
        tmp_path / "ds", num_classes=3, train_per_class=5, val_per_class=2, min_size=60, max_size=90
    )
    spec = weights.get_weight_spec("efficientnet_b0", "DEFAULT")
    preprocessing = Preprocessing(**{**spec.preprocessing.__dict__, "resize_size": 72, "crop_size": 64})
    ours = Loader(ImageFolder(root / "val"), EvalTransform(preprocessing), batch_size=4, shuffle=False)
    from torchvision.transforms._presets import ImageClassification

    reference = ImageClassification(crop_size=64, resize_size=72, interpolation=F.InterpolationMode.BICUBIC)
    loader = torch.utils.data.DataLoader(TorchImageFolder(str(root / "val"), transform=reference), batch_size=4)
    for batch, (x, y) in zip(ours.epoch(0), loader, strict=True):
        n = int(batch.mask.sum())
        from jaxtl.data import normalize

        images = normalize(batch.images[:n], preprocessing.mean, preprocessing.std)
        np.testing.assert_allclose(images, x.numpy().transpose(0, 2, 3, 1), atol=1e-6, rtol=0)
        assert list(batch.labels[:n]) == y.tolist()
