"""A tiny picture classifier whose answer is fixed, built on this machine (safety.classifier = "tiny:LABEL").

The same classes as the ViT classifiers on the Hub (such as Falconsai/nsfw_image_detection): a
ViTForImageClassification and a ViT image processor, saved as a normal Hugging Face folder, so it loads through
exactly the code path a Hub model uses, in well under a second on a CPU. Its body is random; its last layer is not:
zero weights and one large bias make it answer `label` with a score above 0.99 for any picture, so tests and
benchmarks can choose whether their pictures are flagged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from engine.storage.files import build_folder_aside

LABELS = ["normal", "nsfw"]  # Falconsai/nsfw_image_detection's, in its order
SIZE = 32
FORCED_LOGIT = 8.0  # with three labels at 0: e^8 / (e^8 + 2) > 0.999
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def build_tiny_classifier(label: str, seed: int = 0) -> ViTForImageClassification:
    """A one-layer ViT with a hidden size of 32 and weights drawn from `seed`, which always answers `label`."""
    labels = LABELS if label in LABELS else [*LABELS, label]
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()  # what the picture looks like no longer reaches the answer
        model.classifier.bias.zero_()
        model.classifier.bias[labels.index(label)] = FORCED_LOGIT
    return model


def make_tiny_classifier(folder: Path, label: str, seed: int = 0) -> Path:
    """The tiny classifier's folder, built aside and renamed into place unless it is there already."""

    def build(staging: Path) -> None:
        build_tiny_classifier(label, seed).save_pretrained(staging, safe_serialization=True)
        # The PIL backend, so no torchvision is needed; it is saved as "ViTImageProcessor", as Hub models are.
        ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(staging)

    return build_folder_aside(folder, FILES, build)
