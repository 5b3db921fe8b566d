"""jaxtl's weight specs equal torchvision's weight enums: URL, hash, categories, preprocessing, counts."""

import pytest
import torchvision
from archs import by_family
from torchvision.transforms import InterpolationMode

import jaxtl.models
from jaxtl import weights

ARCHS = [a for a in jaxtl.models.list_models() if weights.list_weights(a)]


def test_every_architecture_has_its_torchvision_weights():
    assert ARCHS == jaxtl.models.list_models()
    for arch in ARCHS:
        enum = torchvision.models.get_model_weights(arch)
        assert weights.list_weights(arch) == sorted(member.name for member in enum)
        assert weights.default_weights(arch) == enum.DEFAULT.name


@pytest.mark.parametrize("arch", by_family(ARCHS))
def test_spec_equals_the_torchvision_enum(arch):
    for member in torchvision.models.get_model_weights(arch):
        spec = weights.get_weight_spec(arch, member.name)
        transform = member.transforms()
        assert spec.source == member.url
        assert spec.file_name.split("-")[-1].startswith(spec.sha256_prefix)
        assert spec.categories == tuple(member.meta["categories"])
        assert spec.num_classes == len(member.meta["categories"])
        assert spec.num_params == member.meta["num_params"]
        assert spec.metrics == member.meta["_metrics"]["ImageNet-1K"]
        pre = spec.preprocessing
        assert [pre.resize_size] == list(transform.resize_size)
        assert [pre.crop_size] == list(transform.crop_size)
        assert InterpolationMode(pre.interpolation) == transform.interpolation
        assert list(pre.mean) == list(transform.mean) and list(pre.std) == list(transform.std)
        assert pre.antialias == transform.antialias
