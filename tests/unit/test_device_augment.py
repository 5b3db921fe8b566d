"""The device half of training augmentation: per-sample draws from (seed, epoch, index), one branch or vmap alike."""

import jax
import numpy as np
import pytest
from PIL import Image

from jaxtl.data import CachedTrainTransform, TrainTransform
from jaxtl.data.augment.pipeline import DeviceAugment, make_device_augment
from jaxtl.weights import Preprocessing

AUGMENT = DeviceAugment(policy="trivialaugment", color_jitter=(0.4, 0.4, 0.4, 0.1), erasing_p=0.5)


def crops(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_sample_is_augmented_by_its_seed_epoch_and_index_alone():
    augment = make_device_augment(AUGMENT, seed=3)
    images, indices = crops(), np.array([10, 11, 12, 13, 14, -1], np.int32)
    out = np.asarray(augment(images, indices, 2))
    order = np.array([3, 0, 5, 1, 4, 2])
    shuffled = np.asarray(augment(images[order], indices[order], 2))
    assert np.array_equal(shuffled, out[order])  # the same sample, the same draws, wherever it sits
    assert not np.array_equal(np.asarray(augment(images, indices, 3)), out)  # another epoch, other draws
    assert not np.array_equal(np.asarray(make_device_augment(AUGMENT, seed=4)(images, indices, 2)), out)
    assert not np.array_equal(out, images)


def test_one_branch_per_sample_equals_the_vectorised_batch():
    images, indices = crops(), np.arange(6, dtype=np.int32)
    mapped = make_device_augment(AUGMENT, seed=0, one_branch=True)(images, indices, 1)
    vectorised = make_device_augment(AUGMENT, seed=0, one_branch=False)(images, indices, 1)
    assert np.array_equal(np.asarray(mapped), np.asarray(vectorised))


def test_nothing_random_is_nothing_to_do_and_policies_are_checked():
    assert not DeviceAugment().is_random and AUGMENT.is_random
    with pytest.raises(ValueError, match="policy 'mixup' is not one of none, trivialaugment"):
        DeviceAugment(policy="mixup")
    assert jax.default_backend() == "cpu"  # the suite runs the one-branch path by default


@pytest.mark.parametrize("random_resized_crop, flip_p", [(True, 0.5), (False, 1.0), (False, 0.0)])
def test_the_cached_train_transform_is_the_train_transform_on_the_cached_image(random_resized_crop, flip_p):
    p = Preprocessing(resize_size=73, crop_size=64, interpolation="bicubic")
    cached = np.random.default_rng(1).integers(0, 256, (73, 97, 3), dtype=np.uint8)  # a decoded, resized image
    host = CachedTrainTransform(p, random_resized_crop=random_resized_crop, flip_p=flip_p)
    reference = TrainTransform(p, random_resized_crop=random_resized_crop, flip_p=flip_p)
    for seed in range(5):
        # TrainTransform on the cached pixels (its resize is a no-op there) draws and crops as torchvision does.
        expected = reference(Image.fromarray(cached), np.random.default_rng(seed))
        assert np.array_equal(host(cached, np.random.default_rng(seed)), expected)


def test_importing_the_trainer_leaves_jax_distributed_initialisable():
    # A jax array built at import (a lookup table) starts the XLA backend, and then a multi-process run's
    # jax.distributed.initialize fails ("must be called before any JAX calls").
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import jax, jaxtl.train, jaxtl.cli, jaxtl.data.augment\n"
        f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=1, process_id=0)\n"
        "print(jax.process_count())\njax.distributed.shutdown()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1"
