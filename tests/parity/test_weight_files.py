"""Weight files: weights-only loading, hash checks, converting into the cache, reading it without torch."""

import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert
import jaxtl.models
from convert.parity import eval_logits, to_nhwc
from convert.random_models import randomized_torchvision_model
from jaxtl import weights
from jaxtl.errors import WeightsError, WeightsMismatchError


def _save_with_hash_name(state, directory, stem="resnet18"):
    """Saves like torchvision names its files: <stem>-<first 8 hex digits of the sha256>.pth."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = directory / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


def _cache_entries():
    root = weights.cache_dir()
    return (
        []
        if not root.exists()
        else sorted(p for p in root.rglob("*") if p.is_dir() and p.parent.parent == root / "weights")
    )


class Exploit:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Exploit(marker)}, path)
    with pytest.raises(WeightsError, match="not a plain weights file"):
        convert.convert_weights("resnet18", path)
    assert not marker.exists()
    assert _cache_entries() == []


def test_a_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as file:
        pickle.dump(Exploit(marker), file)
    with pytest.raises(WeightsError, match=f"refusing {path}"):
        convert.load_state_dict_file(path)
    assert not marker.exists()


def test_a_hash_mismatch_is_refused(tmp_path):
    state = randomized_torchvision_model("resnet18", num_classes=4).state_dict()
    good = _save_with_hash_name(state, tmp_path)
    bad = tmp_path / "resnet18-deadbeef.pth"
    bad.write_bytes(good.read_bytes())
    with pytest.raises(WeightsError, match="hash mismatch .* says it starts with deadbeef"):
        convert.convert_weights("resnet18", bad)
    assert _cache_entries() == []


def test_named_weights_in_torch_cache_are_hash_checked(tmp_path):
    # torchvision's resnet18 file in torch.hub's cache, but with other content.
    spec = weights.get_weight_spec("resnet18", "IMAGENET1K_V1")
    target = convert.weight_files.torch_hub_file(spec)
    target.parent.mkdir(parents=True)
    torch.save(randomized_torchvision_model("resnet18", num_classes=1000).state_dict(), target)
    with pytest.raises(WeightsError, match="hash mismatch .*f37072fd"):
        convert.convert_weights("resnet18", "DEFAULT")
    assert _cache_entries() == []


@pytest.mark.parametrize(
    "content, message",
    [(b"", "cannot read"), (b"hello, this is text", "cannot read"), ("truncate", "cannot read")],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content == "truncate":
        torch.save(randomized_torchvision_model("resnet18", num_classes=4).state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        convert.load_state_dict_file(path)


def test_a_state_dict_of_another_architecture_is_refused_with_keys(tmp_path):
    path = _save_with_hash_name(
        randomized_torchvision_model("resnet34", num_classes=4).state_dict(), tmp_path, "resnet34"
    )
    with pytest.raises(WeightsMismatchError, match="layer1.2.\\* \\(10 keys\\)"):
        convert.convert_weights("resnet18", path)
    assert _cache_entries() == []


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state_dict"):
        convert.load_state_dict_file(path)


def test_the_recipe_checkpoint_wrapper_is_accepted(tmp_path):
    state = randomized_torchvision_model("resnet18", num_classes=5).state_dict()
    path = tmp_path / "transfer_classifier.pt"
    torch.save({"model": state, "classes": ["a", "b", "c", "d", "e"], "val_acc": 0.5}, path)
    loaded, _ = convert.load_state_dict_file(path)
    assert loaded.keys() == state.keys()


@pytest.mark.slow
def test_resnet50_with_a_fresh_7_way_head_from_converted_weights(tmp_path):
    torch_model = randomized_torchvision_model("resnet50", num_classes=1000, seed=4)
    path = _save_with_hash_name(torch_model.state_dict(), tmp_path, "resnet50")
    converted = convert.convert_weights("resnet50", path, out=tmp_path / "converted")
    spec = weights.load_weight_spec(converted)
    assert spec.sha256.startswith(path.stem.rsplit("-", 1)[1]) and spec.num_classes == 1000

    model = jaxtl.models.create("resnet50", num_classes=7, weights=converted, seed=0)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch_features = torch.flatten(
            torch_model.avgpool(torch.nn.Sequential(*list(torch_model.children())[:-2])(x)), 1
        )
    features = np.asarray(model.forward_features(jnp.asarray(to_nhwc(x))))
    np.testing.assert_allclose(features, torch_features.numpy(), rtol=1e-4, atol=1e-4)
    assert model.fc.weight.shape == (2048, 7)
    bound = 1 / np.sqrt(2048)
    assert np.abs(np.asarray(model.fc.weight[...])).max() <= bound  # torch's Linear init, not the 1000-way head


def test_converted_weights_load_without_torch(tmp_path):
    torch_model = randomized_torchvision_model("resnet18", num_classes=6, seed=5)
    path = _save_with_hash_name(torch_model.state_dict(), tmp_path)
    converted = convert.convert_weights("resnet18", path)
    assert converted.parent == weights.cache_dir() / "weights" / "resnet18"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.save(tmp_path / "x.npy", to_nhwc(x))
    code = (
        "import sys, numpy as np, jax.numpy as jnp, jaxtl.models\n"
        f"m = jaxtl.models.create('resnet18', weights={str(converted)!r})\n"
        f"m.eval(); print(np.asarray(m(jnp.asarray(np.load({str(tmp_path / 'x.npy')!r})))).tolist())\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.array(eval(result.stdout)), expected, atol=1e-4, rtol=1e-4)


def test_create_converts_a_pth_file_once_and_reuses_the_conversion(tmp_path, monkeypatch):
    torch_model = randomized_torchvision_model("resnet18", num_classes=3, seed=6)
    path = _save_with_hash_name(torch_model.state_dict(), tmp_path)
    model = jaxtl.models.create("resnet18", weights=path)
    assert model.fc.out_features == 3 and len(_cache_entries()) == 1
    assert model.weight_spec.source == str(path.absolute())
    assert model.weight_spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(eval_logits(model, x), expected, atol=1e-4, rtol=1e-4)

    def never(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "load_state_dict_file", never)  # the cached conversion of the same bytes is read
    again = jaxtl.models.create("resnet18", num_classes=5, weights=str(path), seed=1)
    assert again.fc.out_features == 5 and len(_cache_entries()) == 1
    np.testing.assert_array_equal(np.asarray(again.conv1.weight[...]), np.asarray(model.conv1.weight[...]))


def test_an_unknown_weight_name_fails_before_any_download():
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET22K' for resnet50"):
        convert.convert_weights("resnet50", "IMAGENET22K")


def test_zip_member_damage_is_reported(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.arange(1000.0)}, path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert any(name.endswith("data.pkl") for name in names)
    data = bytearray(path.read_bytes())
    data[-200:-100] = b"\0" * 100  # the central directory
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="cannot read"):
        convert.load_state_dict_file(path)
