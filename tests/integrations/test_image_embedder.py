"""mit.ImageEmbedder: pictures in, the modality embedding MiT infuses out, through the checkpoint's own processor and
CLIP tower; checked against the processor and tower run directly, on real images (scikit-learn's digits), with a
tiny random CLIP checkpoint written locally (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mit

pytest.importorskip("PIL")
from PIL import Image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from mit.tuning.image_preprocessing import processor_class as _processor_class

    directory = tmp_path_factory.mktemp("clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    # mean / std other than OpenAI's: the embedder must use the checkpoint's own
    processor = _processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])  # fmt: skip
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def digit_images():
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16 -> 24x40 RGB uint8 pictures (not square: the processor resizes and crops)
    pictures = []
    for image in digits.images[:5]:
        grey = np.kron(image * 15, np.ones((3, 5))).astype(np.uint8)
        pictures.append(np.stack([grey, 255 - grey, grey // 2], axis=-1))
    return pictures


def test_embeddings_are_the_processor_and_tower_run_directly(checkpoint, digit_images, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from mit.tuning.image_preprocessing import processor_class as _processor_class

    embedder = mit.ImageEmbedder.from_pretrained(checkpoint)
    assert embedder.embedding_dim == 16 and embedder.grid_size == (4, 4)
    processor = _processor_class().from_pretrained(checkpoint)
    tower = CLIPVisionModelWithProjection.from_pretrained(checkpoint).eval()
    pil = [Image.fromarray(x) for x in digit_images]
    with torch.no_grad():
        expected = tower(pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]).image_embeds
    got = embedder(pil, batch_size=2)
    assert got.shape == (5, 16)
    torch.testing.assert_close(got, expected)
    # the checkpoint's own mean / std are applied: OpenAI's would give other pixels
    pixels = embedder.pixel_values(pil[:1])
    raw = processor(images=pil[:1], return_tensors="pt", do_normalize=False)["pixel_values"]
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    torch.testing.assert_close(pixels, (raw - mean) / std)
    # arrays, PIL images and files give the same embeddings; one image gives a batch of one
    path = tmp_path / "digit.png"
    pil[0].save(path)
    for source in (digit_images[0], pil[0], path, str(path)):
        torch.testing.assert_close(embedder(source), expected[:1])


def test_multi_level_features_are_the_blocks_outputs(checkpoint, digit_images):
    embedder = mit.ImageEmbedder.from_pretrained(checkpoint)
    emb, levels = embedder(digit_images, feature_layers=[0, 2], batch_size=3)
    assert emb.shape == (5, 16) and [level.shape for level in levels] == [(5, 32, 4, 4)] * 2
    with torch.no_grad():
        out = embedder.tower(pixel_values=embedder.pixel_values(digit_images), output_hidden_states=True)
    # token (row r, column c) of block 2's output is pixel (r, c) of its feature map
    torch.testing.assert_close(levels[1][:, :, 1, 2], out.hidden_states[3][:, 1 + 1 * 4 + 2])
    torch.testing.assert_close(emb, out.image_embeds)


def test_a_picture_reaches_the_model_as_its_modality_embedding(checkpoint, digit_images):
    """The README's path: pictures -> embeddings -> an MiT model's forward and generate."""
    from integration_families import model, randomise

    embedder = mit.ImageEmbedder.from_pretrained(checkpoint)
    infused = mit.apply_mit(model("llama"), mit.MiTConfig(modality_dim=embedder.embedding_dim))
    randomise(infused)
    ids = torch.randint(1, 90, (2, 6))
    first, second = embedder(digit_images[:2]), embedder(digit_images[2:4])
    a = infused(ids, modality_embedding=first).logits
    b = infused(ids, modality_embedding=second).logits
    assert not torch.allclose(a, b)  # the pictures reach the logits
    tokens = infused.generate(ids, modality_embedding=first, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 9)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e([]), "images: expected at least one image"),
        (lambda e: e([1.5]), r"images\[0\]: expected a PIL image, a path or a uint8 numpy array, got float"),
        (lambda e: e(["/no/such.png"]), r"images\[0\]: '/no/such.png' is not a file"),
        (lambda e: e([np.zeros((4, 4, 3), dtype=np.float32)]), r"images\[0\]: expected an \(H, W\) or \(H, W, 3\)"),
        (lambda e: e([np.zeros((4, 4), np.uint8)], batch_size=0), "batch_size: expected an integer >= 1"),
        (lambda e: e([np.zeros((4, 4), np.uint8)], feature_layers=[3]), r"feature_layers: expected block indices"),
    ],
)  # fmt: skip
def test_bad_inputs_are_value_errors_naming_the_argument(checkpoint, call, message):
    with pytest.raises(ValueError, match=message):
        call(mit.ImageEmbedder.from_pretrained(checkpoint))


def test_a_directory_without_the_preprocessor_config_is_refused(checkpoint, tmp_path):
    import shutil

    partial = tmp_path / "weights_only"
    shutil.copytree(checkpoint, partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"path: .* has no preprocessor_config\.json"):
        mit.ImageEmbedder.from_pretrained(partial)
    with pytest.raises(ValueError, match=r"has no config\.json"):
        mit.ImageEmbedder.from_pretrained(tmp_path / "nothing")
