"""The training data path preprocesses images as the encoder's weights expect: a transformers checkpoint's own CLIP
image processor (its preprocessor_config.json), checked against that processor run directly on the datasets' image
files; OpenAI's mean / std (transformers' processor defaults) where a checkpoint has no processor; a processor that
does not fit the tower is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tuning_fixtures import make_food101, make_refcoco

pytest.importorskip("PIL")
from PIL import Image

from mit.tuning.data.common import load_image
from mit.tuning.data.food101 import Food101Dataset
from mit.tuning.data.refcoco import RefCOCODataset
from mit.tuning.encoders import CLIPImageEncoder
from mit.tuning.image_preprocessing import ImagePreprocessing, processor_class

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's: using them proves the checkpoint's processor ran


def write_checkpoint(directory, crop: int = 32, processor: bool = True):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    if processor:
        processor_class()(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                          image_mean=MEAN, image_std=STD).save_pretrained(directory)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocessing")
    return {"food101": make_food101(root / "food"), "refcoco": make_refcoco(root / "refer"),
            "checkpoint": write_checkpoint(root / "clip")}  # fmt: skip


def test_datasets_use_the_checkpoints_own_processor(data):
    encoder = CLIPImageEncoder(pretrained=data["checkpoint"])
    preprocessing = encoder.preprocessing
    assert preprocessing.processor is not None and (list(preprocessing.mean), list(preprocessing.std)) == (MEAN, STD)
    processor = processor_class().from_pretrained(data["checkpoint"])  # the processor, run directly

    food = Food101Dataset(data["food101"], "train", 32, preprocessing=preprocessing)
    openai = Food101Dataset(data["food101"], "train", 32)
    for i in range(len(food)):
        name, _, _, label = food.samples[i]
        picture = load_image(food.image_dir / label / name)
        expected = processor(images=picture, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(food[i]["image"], expected)
        assert not torch.allclose(openai[i]["image"], expected)  # OpenAI's constants would give another input

    # segmentation: square resize (no crop: the mask is resized the same way), the processor's normalisation
    refs = RefCOCODataset(data["refcoco"], "refcoco", "train", image_size=32, preprocessing=preprocessing)
    for i in range(2):
        _, image_id, _, _ = refs.samples[i]
        picture = load_image(refs.image_dir / refs.images[image_id]["file_name"])
        expected = processor(images=picture, size={"height": 32, "width": 32}, do_center_crop=False,
                             return_tensors="pt")["pixel_values"][0]  # fmt: skip
        item = refs[i]
        assert torch.equal(item["image"], expected) and item["mask"].shape == (32, 32)


def test_without_a_processor_file_openai_mean_std_as_transformers_defaults(data, tmp_path):
    encoder = CLIPImageEncoder(pretrained=write_checkpoint(tmp_path / "bare", processor=False))
    preprocessing = encoder.preprocessing
    assert "has no preprocessor_config.json" in preprocessing.source
    default = processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    for shape in ((40, 56, 3), (64, 30, 3)):  # landscape and portrait: the crop keeps the centre
        picture = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        expected = default(images=picture, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(preprocessing.crop(picture), expected)
        square = default(images=picture, size={"height": 32, "width": 32}, do_center_crop=False,
                         return_tensors="pt")["pixel_values"][0]  # fmt: skip
        assert torch.equal(preprocessing.square(picture), square)


def test_a_processor_of_another_size_or_a_mismatched_dataset_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"preprocessor_config.json: its centre crop is 48x48 but the encoder takes "):
        CLIPImageEncoder(pretrained=write_checkpoint(tmp_path / "other", crop=48))
    with pytest.raises(ValueError, match=r"preprocessing: its size is 32 .* but image_size is 64"):
        Food101Dataset(data["food101"], "train", 64, preprocessing=ImagePreprocessing.openai(32))
    with pytest.raises(ValueError, match=r"size: expected an int >= 1"):
        ImagePreprocessing.openai(0)


def test_training_runs_on_the_checkpoints_processor(data, tmp_path):
    """mit train with a transformers checkpoint as --encoder-pretrained: the run's datasets carry its processor."""
    from tuning_fixtures import write_tiny_llama

    from mit.tuning.config import RunConfig
    from mit.tuning.trainer import Trainer

    settings = {"task": "cls", "dataset": "food101", "data": str(data["food101"]), "out": str(tmp_path / "run"),
                "model": str(write_tiny_llama(tmp_path)), "encoder_pretrained": str(data["checkpoint"]),
                "modality_dim": 16, "progress": False, "max_steps": 1, "batch_size": 2}  # fmt: skip
    config = RunConfig.from_dict(settings)
    trainer = Trainer(config)
    try:
        encoder = trainer.unwrapped.encoder
        assert encoder.preprocessing.processor is not None
        for dataset in (trainer.train_dataset, trainer.eval_dataset):
            assert dataset.preprocessing is encoder.preprocessing
    finally:
        trainer.close()


def test_open_clip_towers_use_open_clips_own_evaluation_transforms(monkeypatch):
    """open_clip cannot be imported here (its torchvision needs a matching torch), so this checks what mit asks of it,
    through a stand-in module: open_clip.image_transform for evaluation with the tower's preprocess_cfg, its own
    resize mode for the crop view and "squash" (S x S, no crop) for the segmentation view."""
    import types

    import mit.tuning.clip as clip_module
    from mit.tuning.image_preprocessing import encoder_preprocessing

    calls = []

    def image_transform(size, **kwargs):
        calls.append((size, kwargs))
        tag = float(len(calls))  # which transform ran: 1 = the first one made (crop), 2 = the second (square)
        return lambda image: torch.full((3, size, size), tag) if image.mode == "RGB" else None

    monkeypatch.setattr(clip_module, "import_open_clip", lambda: types.SimpleNamespace(image_transform=image_transform))
    tower = torch.nn.Module()
    tower.preprocess_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear",
                            "resize_mode": "shortest"}  # fmt: skip
    preprocessing = encoder_preprocessing("open_clip", "tag-or-file", tower, 24)
    common = {"is_train": False, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear"}
    assert calls == [(24, {**common, "resize_mode": "shortest"}), (24, {**common, "resize_mode": "squash"})]
    picture = Image.new("L", (30, 20))  # converted to RGB before open_clip sees it
    assert preprocessing.crop(picture)[0, 0, 0] == 1 and preprocessing.square(picture)[0, 0, 0] == 2
    assert preprocessing.mean == (0.1, 0.2, 0.3) and preprocessing.processor is None
