"""Dataset adapters on tiny fixtures in the published formats, and their errors on missing / malformed files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from tuning_fixtures import (
    FOOD_CLASSES,
    make_food101,
    make_mosi,
    make_refcoco,
    make_snli_ve,
    mask_to_rle_counts,
    rle_to_string,
)

from mit.tuning.data import (
    DatasetError,
    Food101Dataset,
    MSADataset,
    RefCOCODataset,
    SNLIVEDataset,
    decode_rle,
    polygons_to_mask,
)


def test_rle_and_polygon_masks():
    # column-major runs: 3x2 mask, counts [1, 2, 3] -> zeros at (0,0); ones at (1,0), (2,0); zeros after
    mask = decode_rle({"size": [3, 2], "counts": [1, 2, 3]})
    assert mask.tolist() == [[False, False], [True, False], [True, False]]
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((7, 9)) > 0.6
        counts = mask_to_rle_counts(m)
        assert (decode_rle({"size": [7, 9], "counts": counts}) == m).all()
        assert (decode_rle({"size": [7, 9], "counts": rle_to_string(counts)}) == m).all()
    # compressed strings: one character per small count ("1" -> 1, ...), also as bytes
    assert decode_rle({"size": [3, 2], "counts": "123"}).tolist() == mask.tolist()
    assert decode_rle({"size": [2, 2], "counts": b"04"}).all()  # 0 zeros, then 4 ones
    square = polygons_to_mask([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 6)
    assert square[1:5, 1:5].all() and square.sum() == 16


@pytest.mark.parametrize(
    "dataset,split_by,splits",
    [("refcoco", "unc", ["train", "val", "testA", "testB"]), ("refcocog", "umd", ["train", "val", "test"])],
)
def test_refcoco(tmp_path, dataset, split_by, splits):
    root = make_refcoco(tmp_path, dataset, split_by)
    sizes = {s: len(RefCOCODataset(root, dataset, s, image_size=32)) for s in splits}
    assert sizes["train"] == 8 and sum(sizes.values()) == 16  # 8 refs x 2 sentences
    data = RefCOCODataset(root, dataset, "train", image_size=32)
    item = data[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert item["prompt"] == "Segment the red square according to the text. #Segmentation:"
    for i in range(0, 8, 2):  # compressed RLE, uncompressed RLE and polygons all give the drawn square
        sample = data[i]
        orig = sample["orig_mask"]
        assert orig.dtype == torch.bool and 0 < orig.sum() < orig.numel()
        assert 0 < sample["mask"].sum() < 32 * 32
    assert len(RefCOCODataset(root, dataset, "train", image_size=32, limit=3)) == 3


def test_refcoco_errors(tmp_path):
    root = make_refcoco(tmp_path)
    with pytest.raises(
        DatasetError, match=r"missing file .*refcoco\+/refs\(unc\)\.p: expected the refcoco\+ refs pickle"
    ):
        RefCOCODataset(root, "refcoco+", "val")
    with pytest.raises(ValueError, match=r"split must be one of .*'testA'.* got 'test'"):
        RefCOCODataset(root, "refcoco", "test")
    with pytest.raises(ValueError, match="split_by 'google' is not published for refcoco"):
        RefCOCODataset(root, "refcoco", "val", split_by="google")
    (root / "refcoco" / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match=r"instances.json: expected COCO JSON with 'images'.*'annotations'"):
        RefCOCODataset(root, "refcoco", "val")
    (root / "refcoco" / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cannot unpickle .*refs\(unc\)\.p"):
        RefCOCODataset(root, "refcoco", "val")
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump({"refs": []}, f)
    with pytest.raises(DatasetError, match="expected a pickled list of ref dicts, got dict"):
        RefCOCODataset(root, "refcoco", "val")


def test_refcoco_missing_image(tmp_path):
    root = make_refcoco(tmp_path)
    data = RefCOCODataset(root, "refcoco", "train", image_size=32)
    (root / "images" / "train2014" / "COCO_train2014_000000000100.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*COCO_train2014_000000000100.jpg: expected an image file"):
        data[0]


def test_food101(tmp_path):
    root = make_food101(tmp_path)
    train, test = Food101Dataset(root, "train", image_size=32), Food101Dataset(root, "test", image_size=32)
    assert train.classes == sorted(FOOD_CLASSES) and test.num_classes == 3
    assert (len(train), len(test)) == (6, 3)
    item = test[2]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 2
    assert item["prompt"].startswith("Classify the food in the image according to the recipe title: sushi recipe")
    (root / "texts" / "test_titles.csv").write_text("a.jpg,only two columns\n")
    with pytest.raises(DatasetError, match=r"test_titles.csv:1: expected 3 columns image_name,text,label, got 2"):
        Food101Dataset(root, "test")
    (root / "texts" / "test_titles.csv").write_text("a.jpg,some text,ramen\n")
    with pytest.raises(DatasetError, match=r"labels \['ramen'\] are not in .*train_titles.csv"):
        Food101Dataset(root, "test")
    with pytest.raises(DatasetError, match=r"missing file .*texts/train_titles.csv: expected UPMC-Food101 titles CSV"):
        Food101Dataset(tmp_path / "nowhere", "train")


def test_snli_ve(tmp_path):
    root = make_snli_ve(tmp_path)
    data = SNLIVEDataset(root, "dev", image_size=32)
    assert len(data) == 3 and data.num_classes == 3 and len(SNLIVEDataset(root, "val")) == 3
    item = data[0]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1  # (0 + 1) % 3: neutral
    assert "a dog is on grass" in item["prompt"]
    with open(root / "snli_ve_test.jsonl", "a") as f:
        f.write('{"Flikr30kID": "1000.jpg", "sentence2": "x"}\n')
    with pytest.raises(DatasetError, match=r"snli_ve_test.jsonl:4: expected a JSON object with Flikr30kID, sentence2"):
        SNLIVEDataset(root, "test")
    (root / "snli_ve_test.jsonl").write_text('{"Flikr30kID": "1000.jpg", "sentence2": "x", "gold_label": "-"}\n')
    with pytest.raises(DatasetError, match=r"gold_label '-' is not one of"):
        SNLIVEDataset(root, "test")


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_mosi(tmp_path, aligned):
    root = make_mosi(tmp_path, aligned=aligned)
    data = MSADataset(root, "train")
    assert len(data) == 6 and data.feature_dims == {"audio": 5, "vision": 20}
    item = data[1]
    assert torch.isfinite(item["features"]["audio"]).all()  # -inf replaced
    assert item["masks"]["audio"].dtype == torch.bool and item["masks"]["audio"].any()
    assert isinstance(item["label"], float) and item["prompt"].startswith("Analyze the sentiment")
    with open(data.path, "rb") as f:
        raw = pickle.load(f)
    n_real = int(np.asarray(raw["train"]["audio_lengths"])[1]) if not aligned else None
    if n_real is not None:
        assert int(item["masks"]["audio"].sum()) == n_real
    assert len(MSADataset(root, "val")) == 6  # alias of MMSA's 'valid'


def test_mosi_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"expected an MMSA feature pickle unaligned_50\.pkl or aligned_50\.pkl"):
        MSADataset(tmp_path, "train")
    root = make_mosi(tmp_path)
    with open(root / "unaligned_50.pkl", "rb") as f:
        data = pickle.load(f)
    del data["test"]["raw_text"]
    data["valid"]["vision"] = data["valid"]["vision"][:, :, 0]
    with open(root / "unaligned_50.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DatasetError, match=r"unaligned_50.pkl \[test\]: no 'raw_text'"):
        MSADataset(root, "test")
    with pytest.raises(DatasetError, match=r"\[valid\]: vision must be \(N=6, T, F\), got \(6, 12\)"):
        MSADataset(root, "valid")
    with open(root / "unaligned_50.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(DatasetError, match="expected a dict with a 'train' split dict, found list"):
        MSADataset(root, "train")
