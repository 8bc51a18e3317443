"""Built-in registry entries: pathology foundation models, an ImageNet baseline and the
shipped ONNX MobileNetV2.

Each entry fixes the hub id, the architecture and its constructor kwargs, the transform, the
output dimension, the inference precision used on GPU and the native resolution, as published
on the model cards. Weights are never downloaded here: the gated ones need an accepted licence
on huggingface.co and ``huggingface-cli download ORG/MODEL`` on a connected machine.
"""
from __future__ import annotations

from .spec import BackboneSpec, frozen_kwargs

__all__ = ["BUILTIN_SPECS", "HOPTIMUS_MEAN", "HOPTIMUS_STD", "SHIPPED_ONNX", "ALIASES"]

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)
SHIPPED_ONNX = "mobilenetv2-12-int8.onnx"

_GATED = "gated on huggingface.co: accept the licence, then `huggingface-cli download {}`"

BUILTIN_SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="uni", kind="timm", model_id="vit_large_patch16_224", hub_id="MahmoodLab/uni",
        kwargs=frozen_kwargs(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                             dynamic_img_size=True),
        pooling="model", input_size=224, interpolation="bilinear", dim=1024,
        precision="bf16", native_mpp=0.5,
        loader_note="ViT-L/16 (UNI, Chen et al. 2024), class token; " + _GATED.format("MahmoodLab/uni"),
    ),
    BackboneSpec(
        name="uni2-h", kind="timm", model_id="vit_giant_patch14_224", hub_id="MahmoodLab/UNI2-h",
        kwargs=frozen_kwargs(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                             no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="silu",
                             reg_tokens=8, dynamic_img_size=True),
        pooling="model", input_size=224, interpolation="bilinear", dim=1536,
        precision="bf16", native_mpp=0.5,
        loader_note=("ViT-H/14 with 8 registers (UNI2-h), class token; "
                     + _GATED.format("MahmoodLab/UNI2-h")),
    ),
    BackboneSpec(
        name="conch-v1.5", kind="titan", model_id="conch_v1_5", hub_id="MahmoodLab/TITAN",
        kwargs=frozen_kwargs(), pooling="model", input_size=448, interpolation="bicubic",
        dim=768, precision="fp16", native_mpp=0.5,
        loader_note=("CONCH v1.5 ViT-L/16 at 448 px, loaded through TITAN: transformers "
                     "AutoModel.from_pretrained('MahmoodLab/TITAN', trust_remote_code=True)"
                     ".return_conch() (needs `pip install transformers einops einops-exts`); "
                     "trained on 512 px tiles at 20x resized to 448; " + _GATED.format("MahmoodLab/TITAN")),
    ),
    BackboneSpec(
        name="virchow2", kind="timm", model_id="vit_huge_patch14_224", hub_id="paige-ai/Virchow2",
        kwargs=frozen_kwargs(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                             reg_tokens=4, global_pool="", dynamic_img_size=True,
                             mlp_layer="SwiGLUPacked", act_layer="silu"),
        pooling="cls_mean", input_size=224, interpolation="bicubic", dim=2560,
        precision="fp16", native_mpp=0.5,
        loader_note=("ViT-H/14 with 4 registers; embedding = class token ++ mean of patch tokens "
                     "(registers excluded), 2 x 1280; CC-BY-NC-ND; " + _GATED.format("paige-ai/Virchow2")),
    ),
    *(BackboneSpec(   # H-optimus-0 and -1: one architecture, two sets of weights
        name=f"h-optimus-{v}", kind="timm", model_id="vit_giant_patch14_reg4_dinov2",
        hub_id=f"bioptimus/H-optimus-{v}",
        kwargs=frozen_kwargs(img_size=224, init_values=1e-5, num_classes=0, global_pool="token",
                             dynamic_img_size=False),
        pooling="model", input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        interpolation="bicubic", dim=1536, precision="fp16", native_mpp=0.5,
        loader_note=("ViT-g/14 with 4 registers (1.1B), class token; "
                     + _GATED.format(f"bioptimus/H-optimus-{v}")),
    ) for v in (0, 1)),
    BackboneSpec(
        name="phikon-v2", kind="transformers", model_id="owkin/phikon-v2", hub_id="owkin/phikon-v2",
        kwargs=frozen_kwargs(), pooling="cls", input_size=224, interpolation="bilinear",
        dim=1024, precision="bf16", native_mpp=0.5,
        loader_note=("ViT-L/16 DINOv2 (transformers Dinov2Model), class token of last_hidden_state; "
                     "loaded with transformers AutoModel (`pip install transformers`); not a timm checkpoint"),
    ),
    BackboneSpec(
        name="prov-gigapath", kind="timm", model_id="vit_giant_patch14_dinov2",
        hub_id="prov-gigapath/prov-gigapath",
        kwargs=frozen_kwargs(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                             num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
        pooling="model", input_size=224, crop_pct=224 / 256, interpolation="bicubic", dim=1536,
        precision="fp16", native_mpp=0.5,
        loader_note=("Prov-GigaPath tile encoder, ViT-g/16 (1.1B), class token; resize 256 + centre "
                     "crop 224 as published; " + _GATED.format("prov-gigapath/prov-gigapath")),
    ),
    BackboneSpec(
        name="midnight", kind="transformers", model_id="kaiko-ai/midnight", hub_id="kaiko-ai/midnight",
        kwargs=frozen_kwargs(), pooling="cls_mean", input_size=224, mean=HALF, std=HALF,
        interpolation="bicubic", dim=3072, precision="bf16", native_mpp=0.5,
        loader_note=("Midnight-12k, ViT-g/14 DINOv2 (transformers Dinov2Model, MIT); embedding = class "
                     "token ++ mean of patch tokens, 2 x 1536; trained at 0.25-2 um/px; loaded with "
                     "transformers AutoModel (`pip install transformers`)"),
    ),
    BackboneSpec(
        name="resnet50-tv-in1k", kind="timm", model_id="resnet50", hub_id="timm/resnet50.tv_in1k",
        kwargs=frozen_kwargs(num_classes=0), pooling="model", input_size=224,
        interpolation="bilinear", dim=2048, precision="fp32", native_mpp=None,
        loader_note="ImageNet-1k ResNet-50 (torchvision weights through timm), global average pool; baseline",
    ),
    BackboneSpec(
        name="mobilenetv2-onnx-int8", kind="onnx", model_id=SHIPPED_ONNX, hub_id=None,
        kwargs=frozen_kwargs(), pooling="model", input_size=224, interpolation="bilinear",
        dim=1280, precision="int8", native_mpp=None,
        loader_note=("ONNX Model Zoo MobileNetV2-12 int8 (ImageNet); embedding = dequantised 1280-d "
                     "global-average-pooled tensor before the classifier, exposed at load time; "
                     "file shipped in sample_data/models"),
    ),
)

# Other tools' names for the entries above: TRIDENT's patch encoder names (``enc_name`` in
# trident/patch_encoder_models/load.py, the ``features_<encoder>`` folders and the ``encoder``
# attribute of its h5 files). Only encoders whose output is the entry's own vector are listed:
# TRIDENT's ``resnet50`` (cut after layer 3, 1024-d) and ``midnight12k`` (class token only,
# 1536-d) are other embedding spaces than ``resnet50-tv-in1k`` and ``midnight``, so not aliased.
ALIASES: dict[str, str] = {
    "uni_v1": "uni",
    "uni_v2": "uni2-h",
    "conch_v15": "conch-v1.5",
    "virchow2": "virchow2",
    "phikon_v2": "phikon-v2",
    "gigapath": "prov-gigapath",
    "hoptimus0": "h-optimus-0",
    "hoptimus1": "h-optimus-1",
}
