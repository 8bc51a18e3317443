"""Backbone registry: names, specs, weights (files, cache, refusal), embeddings, ONNX surgery,
and the big foundation models built on the meta device."""
from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedstore.backbones import (
    BackboneSpec, build_module, create_backbone, get_spec, list_backbones, register_backbone,
)
from embedstore.backbones import _registry
from embedstore.backbones.onnx import find_pooled_output
from embedstore.errors import (
    BackboneMismatchError, ConfigError, DimensionMismatchError, UnknownBackboneError, WeightsNotFoundError,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX_FILE = SAMPLE / "models" / "mobilenetv2-12-int8.onnx"
ONNX_SHA256 = "83530ad811bc31d2b60a5599a21265a5057608c9b044b4ee758cc22f2309f54f"

FOUNDATION = ["uni", "uni2-h", "conch-v1.5", "virchow2", "h-optimus-0", "h-optimus-1",
              "phikon-v2", "prov-gigapath", "midnight", "resnet50-tv-in1k"]
# name -> (dim, parameter count range in millions), as published on the model cards
META_SIZES = {
    "uni": (1024, 300, 310), "uni2-h": (1536, 675, 690), "virchow2": (2560, 625, 640),
    "h-optimus-0": (1536, 1125, 1145), "h-optimus-1": (1536, 1125, 1145),
    "prov-gigapath": (1536, 1125, 1145), "resnet50-tv-in1k": (2048, 23, 26),
}


def tiles(folder: str, n: int) -> np.ndarray:
    """``(n, H, W, 3) uint8`` real H&E tiles from the shipped sample data (every 3rd file)."""
    files = sorted((SAMPLE / folder).rglob("*.jp*g"))[::3][:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture
def no_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch hub caches, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def clean_registry():
    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


# -- registry -----------------------------------------------------------------------------

def test_listing_and_lookup():
    names = list_backbones()
    assert names == sorted(names)
    assert set(FOUNDATION) | {"mobilenetv2-onnx-int8"} <= set(names)
    assert list_backbones("h-optimus-*") == ["h-optimus-0", "h-optimus-1"]
    assert list_backbones("UNI*") == ["uni", "uni2-h"]
    assert get_spec("UNI2-h").name == "uni2-h"
    assert get_spec("hf-hub:MahmoodLab/UNI2-h") is get_spec("uni2-h")
    assert get_spec("hf_hub:paige-ai/Virchow2").name == "virchow2"


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownBackboneError, match=r"close matches: .*uni2-h") as info:
        get_spec("uni2h")
    assert isinstance(info.value, KeyError) and "\n" not in str(info.value)
    with pytest.raises(UnknownBackboneError, match="resnet18"):
        create_backbone("resnet19", random_init=True)
    with pytest.raises(UnknownBackboneError, match="close matches: none"):
        get_spec("zzzzzz-qqqq")


def test_plain_timm_names_are_accepted():
    spec = get_spec("resnet18")
    assert (spec.kind, spec.model_id, spec.dim, spec.hub_id) == ("timm", "resnet18", 512,
                                                                 "timm/resnet18.a1_in1k")
    tagged = get_spec("resnet50.tv_in1k")
    assert (tagged.model_id, tagged.hub_id, tagged.dim, tagged.interpolation) == (
        "resnet50", "timm/resnet50.tv_in1k", 2048, "bilinear")
    vit = get_spec("vit_small_patch16_224")
    assert vit.dim == 384 and vit.mean == (0.5, 0.5, 0.5)


def test_register_backbone(clean_registry):
    spec = BackboneSpec(name="my-resnet", kind="timm", model_id="resnet18", dim=512,
                        kwargs={"num_classes": 0}, interpolation="bilinear")
    assert register_backbone(spec) is spec
    register_backbone(spec)  # same spec again: fine
    assert "my-resnet" in list_backbones() and get_spec("My-ResNet") == spec
    other = spec.replace(dim=256)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(other)
    register_backbone(other, overwrite=True)
    assert get_spec("my-resnet").dim == 256


# -- spec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FOUNDATION + ["mobilenetv2-onnx-int8", "resnet18"])
def test_spec_round_trip(name):
    spec = get_spec(name)
    as_json = json.loads(json.dumps(spec.to_dict()))
    assert as_json == spec.to_dict()
    again = BackboneSpec.from_dict(as_json)
    assert again == spec and hash(again) == hash(spec)
    assert spec.dim > 0 and spec.loader_note


def test_spec_fields_and_validation():
    uni2 = get_spec("uni2-h").model_kwargs
    assert (uni2["mlp_layer"], uni2["act_layer"], uni2["reg_tokens"], uni2["embed_dim"]) == (
        "SwiGLUPacked", "silu", 8, 1536)
    hopt = get_spec("h-optimus-0")
    assert hopt.mean == (0.707223, 0.578729, 0.703617) and hopt.std == (0.211883, 0.230117, 0.177517)
    assert all(get_spec(n).native_mpp == 0.5 for n in FOUNDATION if n != "resnet50-tv-in1k")
    a = BackboneSpec(name="a", kind="timm", model_id="resnet18", dim=512, kwargs={"b": 1, "a": [2]})
    b = BackboneSpec(name="a", kind="timm", model_id="resnet18", dim=512, kwargs='{"a": [2], "b": 1}')
    assert a == b and a.kwargs == '{"a":[2],"b":1}'
    assert a == a.replace(kwargs=(("b", 1), ("a", [2])))
    with pytest.raises(ValueError, match="interpolation"):
        a.replace(interpolation="nearest")
    with pytest.raises(ValueError, match="JSON"):
        BackboneSpec(name="a", kind="timm", model_id="resnet18", dim=512, kwargs={"act": torch.nn.SiLU})
    with pytest.raises(ValueError, match="unknown fields"):
        BackboneSpec.from_dict({**a.to_dict(), "colour": "blue"})


# -- timm models, random init and checkpoints ---------------------------------------------

def test_random_init_is_deterministic():
    batch = torch.from_numpy(tiles("pcam", 4))
    state = torch.random.get_rng_state()
    first = create_backbone("resnet18", random_init=True)
    second = create_backbone("resnet18", random_init=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    emb = first.embed(batch)
    assert emb.shape == (4, 512) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.equal(emb, second.embed(batch))
    assert not torch.allclose(emb[0], emb[1])
    assert first.weights_sha256 == "random-init:seed=0"
    assert first.fingerprint() == second.fingerprint()
    assert first.fingerprint()["spec"] == get_spec("resnet18").to_dict()


def test_random_init_is_identical_across_processes():
    code = ("import torch; from embedstore.backbones import create_backbone;"
            "m = create_backbone('resnet18', random_init=True).module;"
            "print(sum(float(p.double().sum()) for p in m.parameters()).hex())")
    here = create_backbone("resnet18", random_init=True).module
    expected = sum(float(p.double().sum()) for p in here.parameters()).hex()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def _reference_embedding(model: torch.nn.Module, batch: np.ndarray, spec: BackboneSpec) -> torch.Tensor:
    """Simple reference path: 224 px tiles, no resize, numpy normalisation, plain forward."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("resnet18", num_classes=1000).eval()  # with its classifier
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    backbone = create_backbone("resnet18", weights=path)
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    batch = tiles("lung", 3)
    source.reset_classifier(0)
    expected = _reference_embedding(source, batch, backbone.spec)
    got = backbone.embed(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, create_backbone("resnet18", random_init=True).embed(batch))


class Payload:
    """An arbitrary object: unpickling it would run code of the pickler's choosing."""

    def __init__(self) -> None:
        self.weights = torch.zeros(3)


def test_pickled_objects_and_wrong_weights_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError, match="weights_only") as info:
        create_backbone("resnet18", weights=evil)
    assert "\n" not in str(info.value) and str(evil) in str(info.value)
    import timm

    other = tmp_path / "resnet34.pt"
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), other)
    with pytest.raises(BackboneMismatchError, match="resnet18"):
        create_backbone("resnet18", weights=other)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone("resnet18", weights=tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not both"):
        create_backbone("resnet18", weights=other, random_init=True)


def test_missing_weights_name_the_hub_id(no_caches):
    for name, hub_id in [("uni", "MahmoodLab/uni"), ("h-optimus-1", "bioptimus/H-optimus-1"),
                         ("phikon-v2", "owkin/phikon-v2"), ("resnet18", "timm/resnet18.a1_in1k")]:
        with pytest.raises(WeightsNotFoundError, match="not found") as info:
            create_backbone(name)
        message = str(info.value)
        assert hub_id in message and f"huggingface-cli download {hub_id}" in message
        assert "weights=FILE" in message and "\n" not in message
        assert str(no_caches / "hf") in message
    with pytest.raises(WeightsNotFoundError, match="hf-hub:someone/model"):
        get_spec("hf-hub:someone/model")


def _put_in_hf_cache(cache: Path, hub_id: str, filename: str, data: bytes) -> Path:
    """Lay a file out as huggingface_hub's cache does (refs/main -> snapshots/<rev>/file)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_weights_from_the_local_hf_cache(no_caches, tmp_path):
    import timm
    from safetensors.torch import save

    torch.manual_seed(7)
    source = timm.create_model("resnet18", num_classes=0).eval()
    data = save({k: v.contiguous() for k, v in source.state_dict().items()})
    _put_in_hf_cache(no_caches / "hf", "timm/resnet18.a1_in1k", "model.safetensors", data)
    backbone = create_backbone("resnet18")
    assert backbone.weights_sha256 == hashlib.sha256(data).hexdigest()
    batch = tiles("lung", 2)
    expected = _reference_embedding(source, batch, backbone.spec)
    torch.testing.assert_close(backbone.embed(batch), expected, rtol=1e-4, atol=1e-4)
    # an hf-hub id outside the registry: the architecture comes from its cached timm config.json
    config = {"architecture": "resnet18", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bilinear",
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    _put_in_hf_cache(no_caches / "hf", "lab/tiny-resnet", "config.json", json.dumps(config).encode())
    _put_in_hf_cache(no_caches / "hf", "lab/tiny-resnet", "model.safetensors", data)
    hub = create_backbone("hf-hub:lab/tiny-resnet")
    assert (hub.spec.model_id, hub.spec.hub_id, hub.dim, hub.spec.interpolation) == (
        "resnet18", "lab/tiny-resnet", 512, "bilinear")
    torch.testing.assert_close(hub.embed(batch), expected, rtol=1e-4, atol=1e-4)


# -- preprocessing and precision ----------------------------------------------------------

def test_preprocess_resizes_crops_and_validates():
    backbone = create_backbone("resnet18", random_init=True)
    pcam = tiles("pcam", 2)
    assert pcam.shape[1:] == (96, 96, 3)
    x = backbone.preprocess(pcam)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    flat = np.full((1, 96, 96, 3), 128, np.uint8)  # a flat tile stays flat after resizing
    expected = (128 / 255 - torch.tensor(backbone.spec.mean)) / torch.tensor(backbone.spec.std)
    torch.testing.assert_close(backbone.preprocess(flat)[0, :, 100, 100], expected)
    crop = backbone.spec.replace(crop_pct=224 / 256)
    gigapath_like = create_backbone(crop, random_init=True)
    big = np.zeros((1, 256, 256, 3), np.uint8)
    big[:, 16:240, 16:240] = 255  # the centre 224 of a 256 tile is exactly this square
    centre = gigapath_like.preprocess(big)
    assert centre.shape == (1, 3, 224, 224)
    torch.testing.assert_close(centre.amin(), ((1 - torch.tensor(crop.mean)) / torch.tensor(crop.std)).min())
    with pytest.raises(ValueError, match="uint8"):
        backbone.embed(pcam.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        backbone.embed(pcam[..., :2].copy())
    with pytest.raises(TypeError, match="uint8"):
        backbone.embed(pcam.tolist())
    assert backbone.embed(pcam[:0]).shape == (0, 512)


def test_preprocess_at_input_size_is_the_normalisation_in_the_runs_layout(mobilenet):
    """Tiles already at 224 px take the fused numpy pass: the same numbers as the formula, in
    channels-last for torch modules and NCHW for onnxruntime, and embeddings that match the
    torch chain (float, /255, -mean, /std) fed to the same session."""
    lung = tiles("lung", 4)                                 # real H&E tiles at the input size
    assert lung.shape[1:] == (224, 224, 3)
    spec = mobilenet.spec
    want = (torch.from_numpy(lung).permute(0, 3, 1, 2).double() / 255
            - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    resnet = create_backbone("resnet18", random_init=True)
    for backbone, layout in ((resnet, torch.channels_last), (mobilenet, torch.contiguous_format)):
        x = backbone.preprocess(lung)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=layout)
        torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-6)
    assert not resnet.preprocess(lung).is_contiguous()      # channels-last is not NCHW
    reference = mobilenet._run(want.float().contiguous())
    torch.testing.assert_close(mobilenet.embed(lung), reference, rtol=0, atol=2 * mobilenet.pooled.scale)


def test_precision_is_recorded_in_the_spec():
    fp32 = create_backbone("resnet18", random_init=True)
    bf16 = create_backbone("resnet18", random_init=True, precision="bf16")
    assert fp32.spec.precision == "fp32" and bf16.spec.precision == "bf16"
    assert fp32.fingerprint() != bf16.fingerprint()
    batch = tiles("lung", 2)
    a, b = fp32.embed(batch), bf16.embed(batch)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)
    assert create_backbone("uni", random_init=True, device="meta").spec.precision == "fp32"
    stored = get_spec("resnet18").replace(precision="bf16")  # an explicit spec is taken as is
    assert create_backbone(stored, random_init=True).fingerprint() == bf16.fingerprint()


def test_wrong_spec_dim_is_caught():
    spec = get_spec("resnet18").replace(name="resnet18-wrong", dim=256)
    with pytest.raises(DimensionMismatchError, match="256"):
        create_backbone(spec, random_init=True).embed(tiles("pcam", 1))


# -- ONNX ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet():
    return create_backbone("mobilenetv2-onnx-int8", num_threads=1)


def test_onnx_embeddings(mobilenet):
    assert mobilenet.dim == 1280 and mobilenet.weights_sha256 == ONNX_SHA256
    pooled = mobilenet.pooled
    assert pooled.scale is not None and pooled.scale > 0 and pooled.zero_point is not None
    pcam = tiles("pcam", 6)
    assert mobilenet.preprocess(pcam).shape == (6, 3, 224, 224)
    emb = mobilenet.embed(pcam)
    assert emb.shape == (6, 1280) and emb.dtype == torch.float32
    assert torch.equal(emb, mobilenet.embed(pcam))
    assert (emb >= 0).all() and emb.unique().numel() > 100  # dequantised ReLU6 averages
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0  # different tiles differ
    steps = emb / pooled.scale  # values sit on the quantisation grid
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)


def test_onnx_embedding_reproduces_the_graph_classifier(mobilenet):
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ONNX_FILE)).graph.initializer}

    def deq(prefix: str) -> np.ndarray:
        q = init[f"{prefix}_quantized"].astype(np.float32)
        return (q - init[f"{prefix}_zero_point"].astype(np.float32)) * init[f"{prefix}_scale"]

    batch = tiles("lung", 12)
    x = mobilenet.preprocess(batch)
    emb, logits = mobilenet._run(x).numpy(), mobilenet.run(x, ["output"])[0]
    ours = emb @ deq("classifier.1.weight") + deq("classifier.1.bias")
    assert (ours.argmax(1) == logits.argmax(1)).mean() >= 0.9
    assert np.corrcoef(ours.ravel(), logits.ravel())[0, 1] > 0.99


def test_onnx_graph_surgery_finds_the_pooled_tensor():
    import onnx

    model = onnx.load(str(ONNX_FILE))
    pooled = find_pooled_output(model)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[pooled.name] in ("Reshape", "Flatten")
    assert pooled.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["output"]  # the file itself is untouched


def test_onnx_file_by_path_and_missing_file(tmp_path):
    spec = get_spec(str(ONNX_FILE))
    assert (spec.kind, spec.dim, spec.input_size) == ("onnx", 1280, 224)
    missing = get_spec("mobilenetv2-onnx-int8").replace(name="gone", model_id="gone.onnx")
    with pytest.raises(WeightsNotFoundError, match="gone.onnx"):
        create_backbone(missing)
    with pytest.raises(ValueError, match="precision"):
        create_backbone("mobilenetv2-onnx-int8", precision="bf16")


# -- foundation models on the meta device -------------------------------------------------

@pytest.mark.parametrize("name", sorted(META_SIZES))
def test_foundation_model_shapes_on_meta(name):
    dim, low, high = META_SIZES[name]
    spec = get_spec(name)
    backbone = create_backbone(name, random_init=True, device="meta")
    params = list(backbone.module.parameters())
    assert all(p.is_meta for p in params)  # nothing materialised
    assert low <= sum(p.numel() for p in params) / 1e6 <= high
    out = backbone.module(torch.empty(2, 3, spec.input_size, spec.input_size, device="meta"))
    assert tuple(out.shape) == (2, dim) == (2, spec.dim)


def test_meta_build_of_virchow2_pools_cls_and_mean():
    spec = get_spec("virchow2")
    module = build_module(spec, device="meta")
    assert module.pooling == "cls_mean" and module.num_prefix_tokens == 5  # class + 4 registers
    tokens = module.trunk.forward_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert tuple(tokens.shape) == (1, 5 + 16 * 16, 1280)


def test_non_timm_entries_say_what_loads_them(no_caches):
    assert "TITAN" in get_spec("conch-v1.5").loader_note
    for name in ("phikon-v2", "midnight"):
        assert "transformers" in get_spec(name).loader_note
    with pytest.raises(ValueError, match="TITAN"):
        build_module(get_spec("conch-v1.5"), device="meta")
    with pytest.raises(ValueError, match="meta"):
        create_backbone("resnet18", device="meta")
    with pytest.raises(WeightsNotFoundError, match="MahmoodLab/TITAN"):
        create_backbone("conch-v1.5")


def test_importing_the_package_is_light():
    code = ("import sys, embedstore; before = set(sys.modules);"
            "import embedstore.backbones as b; b.get_spec('uni2-h'); b.list_backbones();"
            "print(sorted(m for m in ('torch', 'timm', 'onnxruntime', 'onnx')"
            " if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu():
    batch = tiles("pcam", 4)
    cpu = create_backbone("resnet18", random_init=True)
    gpu = create_backbone("resnet18", random_init=True, device="cuda", precision="fp16")
    emb = gpu.embed(torch.from_numpy(batch).pin_memory())
    assert emb.device.type == "cpu" and emb.dtype == torch.float32
    torch.testing.assert_close(emb, cpu.embed(batch), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("spec, gpus, want", [
    ("cpu", 0, ["cpu"]), ("cpu,cpu", 0, ["cpu", "cpu"]), (" cpu , cpu ", 0, ["cpu", "cpu"]),
    ("all", 0, ["cpu"]), ("all", 2, ["cuda:0", "cuda:1"]), ("cuda:1,cuda:0", 2, ["cuda:1", "cuda:0"]),
    ("cuda", 1, ["cuda"]), ("mps", 0, ["mps"]),
    ("", 0, "names no device"), ("  ", 2, "names no device"), ("cpu,bogus", 2, "'bogus' is not a device"),
    ("cpu,,cpu", 0, "an empty entry"), ("cuda:9", 0, "CUDA is not available"),
    ("cuda:2", 2, "has 2 GPU"), ("cuda", 0, "CUDA is not available"), ("mps:1", 0, "not a device"),
    ("cuda:-1", 2, "not a device"), ("all,cpu", 2, "not a device"),
])
def test_parse_devices(spec: str, gpus: int, want: object) -> None:
    from embedstore.backbones.devices import parse_devices

    if isinstance(want, list):
        assert parse_devices(spec, cuda_count=gpus) == want
        return
    with pytest.raises(ConfigError, match=str(want)) as err:
        parse_devices(spec, cuda_count=gpus)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--devices {spec!r}")


def test_parse_devices_asks_torch_only_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedstore.backbones import devices

    calls: list[int] = []
    monkeypatch.setattr(devices, "cuda_device_count", lambda: calls.append(1) or 0)
    assert devices.parse_devices("cpu,cpu") == ["cpu", "cpu"] and calls == []
    with pytest.raises(ConfigError):
        devices.parse_devices("cuda:0,cuda:1")
    assert calls == [1]
