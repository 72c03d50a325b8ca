"""Tiny synthetic fixtures in the published on-disk formats of the paper's datasets, a tiny random Llama directory
with a word-level tokenizer, and a tiny open_clip model config."""

from __future__ import annotations

import csv
import json
import pathlib
import pickle

import numpy as np
import torch
from PIL import Image

TINY_CLIP = {  # transformers CLIPVisionConfig fields: 16-d embedding, 32 wide, 3 blocks, 4x4 patches of 8 pixels
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 8, "projection_dim": 16, "hidden_act": "quick_gelu",
}  # fmt: skip
WORDS = (
    "segment the according to text . # segmentation : classify food in image recipe title , category does entail "
    "contradict or not determine hypothesis ? relation analyze sentiment of speaker who says red square blue circle "
    "left right big small apple pie pizza sushi a dog is sitting on grass man plays guitar it was great terrible ok "
    "movie i liked really bad"
).split()
FOOD_CLASSES = ("apple_pie", "pizza", "sushi")


def rle_to_string(counts: list[int]) -> str:
    """pycocotools' rleToString (the inverse of mit.tuning.data.refcoco's decoder), for fixtures."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def mask_to_rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.uint8)  # column-major
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return counts


def write_tiny_clip_config(directory: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(directory) / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def write_tiny_llama(directory: pathlib.Path, hidden: int = 32, layers: int = 2, causal: bool = False) -> pathlib.Path:
    """A random LlamaModel (hidden 32, 2 layers, 4 heads / 2 KV heads; ``causal``: LlamaForCausalLM, with its LM
    head) and a whitespace word-level tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

    directory = pathlib.Path(directory)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    (LlamaForCausalLM if causal else LlamaModel)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _image(seed: int, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    w, h = size
    array = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x1, y1 = x0 + w // 3, y0 + h // 3
    array[y0:y1, x0:x1] = (200, 30, 30)
    return Image.fromarray(array), (x0, y0, x1, y1)


def make_refcoco(root: pathlib.Path, dataset: str = "refcoco", split_by: str = "unc", images: int = 4) -> pathlib.Path:
    """refer-toolkit layout: <root>/<dataset>/refs(<split_by>).p, instances.json, <root>/images/train2014/*.jpg.

    Image 0's annotation is a compressed RLE, image 1's an uncompressed RLE, the others polygons. Refs alternate
    over the dataset's splits; each has two sentences."""
    root = pathlib.Path(root)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    image_dir = root / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    splits = {"refcocog": ["train", "val", "test"]}.get(dataset, ["train", "val", "testA", "testB"])
    coco_images, annotations, refs = [], [], []
    for i in range(images):
        image_id = 100 + i
        size = (40 + 4 * i, 36)
        image, (x0, y0, x1, y1) = _image(i, size)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        image.save(image_dir / name, quality=95)
        coco_images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
        if i in (0, 1):
            mask = np.zeros((size[1], size[0]), dtype=bool)
            mask[y0:y1, x0:x1] = True
            counts = mask_to_rle_counts(mask)
            segmentation = {"size": [size[1], size[0]], "counts": rle_to_string(counts) if i == 0 else counts}
        else:
            segmentation = [polygon]
        annotations.append(
            {
                "id": 1000 + i,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": segmentation,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            }
        )
        for r in range(2):
            ref_id = 10 * i + r
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": 1000 + i,
                    "image_id": image_id,
                    "category_id": 1,
                    "split": "train" if r == 0 else splits[1 + i % (len(splits) - 1)],
                    "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
                    "sentences": [
                        {"sent": "red square", "raw": "Red square.", "sent_id": 2 * ref_id},
                        {
                            "sent": "the big red square left",
                            "raw": "the big red square left",
                            "sent_id": 2 * ref_id + 1,
                        },
                    ],
                }
            )
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    instances = {"images": coco_images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    return root


def make_food101(root: pathlib.Path, per_class: int = 2) -> pathlib.Path:
    """UPMC-Food101 layout: texts/{train,test}_titles.csv (image_name,text,label) and images/<split>/<label>/."""
    root = pathlib.Path(root)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("test", 1)):
        rows = []
        for c, label in enumerate(FOOD_CLASSES):
            (root / "images" / split / label).mkdir(parents=True, exist_ok=True)
            for j in range(count):
                name = f"{label}_{split}_{j}.jpg"
                _image(10 * c + j, (48, 40))[0].save(root / "images" / split / label / name)
                rows.append((name, f"{label.replace('_', ' ')} recipe, really great", label))
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def make_snli_ve(root: pathlib.Path) -> pathlib.Path:
    """SNLI-VE layout: snli_ve_{train,dev,test}.jsonl and flickr30k_images/."""
    root = pathlib.Path(root)
    (root / "flickr30k_images").mkdir(parents=True, exist_ok=True)
    labels = ("entailment", "neutral", "contradiction")
    for s, split in enumerate(("train", "dev", "test")):
        lines = []
        for i in range(6 if split == "train" else 3):
            image = f"{1000 + i}.jpg"
            if not (root / "flickr30k_images" / image).exists():
                _image(i, (40, 40))[0].save(root / "flickr30k_images" / image)
            lines.append(
                json.dumps(
                    {
                        "Flikr30kID": image,
                        "sentence1": "a dog is sitting on grass",
                        "sentence2": "a man plays guitar" if i % 2 else "a dog is on grass",
                        "gold_label": labels[(i + s) % 3],
                        "pairID": f"{split}-{i}",
                        "captionID": f"{1000 + i}.jpg#0",
                    }
                )
            )
        (root / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_mosi(root: pathlib.Path, aligned: bool = False, n: int = 6) -> pathlib.Path:
    """MMSA feature pickle: {train, valid, test: {raw_text, text, text_bert, audio, vision, regression_labels,
    audio_lengths, vision_lengths (unaligned only), id, ...}} with MOSI's feature sizes (audio 5, vision 20)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ta, tv = (8, 8) if aligned else (10, 12)
    data = {}
    for s, split in enumerate(("train", "valid", "test")):
        labels = np.round(rng.uniform(-3, 3, n), 1).astype(np.float32)
        labels[0] = 0.0
        audio = rng.normal(size=(n, ta, 5)).astype(np.float32)
        vision = rng.normal(size=(n, tv, 20)).astype(np.float32)
        audio_lengths = rng.integers(2, ta + 1, n)
        vision_lengths = rng.integers(2, tv + 1, n)
        for i in range(n):
            audio[i, audio_lengths[i] :] = 0
            vision[i, vision_lengths[i] :] = 0
        audio[1, 0, 0] = -np.inf  # as in the distributed MOSI acoustic features
        part = {
            "raw_text": np.array(["it was great movie" if y > 0 else "really bad movie i liked not" for y in labels]),
            "text": rng.normal(size=(n, 50, 768)).astype(np.float32)[:, :4],
            "text_bert": np.zeros((n, 3, 50), dtype=np.float32),
            "audio": audio,
            "vision": vision,
            "regression_labels": labels,
            "classification_labels": (labels > 0).astype(np.float32),
            "id": np.array([f"clip{s}_{i}" for i in range(n)]),
        }
        if not aligned:
            part["audio_lengths"], part["vision_lengths"] = audio_lengths.tolist(), vision_lengths.tolist()
        data[split] = part
    name = "aligned_50.pkl" if aligned else "unaligned_50.pkl"
    with open(root / name, "wb") as f:
        pickle.dump(data, f)
    return root


MMUD_OBJECTS = (("red square", "the red box"), ("blue circle",), ("big apple",))


def make_mmud(root: pathlib.Path, records: int = 3, glb_dim: int = 8, splits=("train", "valid")) -> pathlib.Path:
    """MMUD's published layout: <root>/<split>.pkl (a list of 12-tuples, see mit.tuning.data.mmud), the images in
    <root>/MergedImages/ (named by the last component of a Windows image_path, as the authors' files are), and
    <root>/CLIPGENFeatureUN/<image>.pkl (a pickled (1, glb_dim) tensor).

    Record i has 2 + i % 2 objects, each a rectangle; record 0's masks are flat COCO polygons, the others' COCO RLE
    (a list of one uncompressed RLE dict, as the RefClef records). Its enriched text mentions <LCL-2> before <LCL-1>
    and <LCL-2> twice."""
    root = pathlib.Path(root)
    (root / "MergedImages").mkdir(parents=True, exist_ok=True)
    (root / "CLIPGENFeatureUN").mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(splits):
        rows = []
        for i in range(records):
            seed = 100 * s + i
            name = f"{seed}.jpg"
            width, height = 40 + 4 * i, 36
            image, _ = _image(seed, (width, height))
            image.save(root / "MergedImages" / name, quality=95)
            torch.manual_seed(seed)
            with open(root / "CLIPGENFeatureUN" / f"{name}.pkl", "wb") as f:
                pickle.dump(torch.randn(1, glb_dim), f)
            count = 2 + i % 2
            masks, boxes = [], []
            for k in range(count):
                x0, y0, x1, y1 = 4 + 10 * k, 4 + 6 * k, 14 + 10 * k, 20 + 6 * k
                boxes.append([x0, y0, x1 - x0, y1 - y0])
                if i == 0:
                    masks.append([float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)])
                else:
                    mask = np.zeros((height, width), dtype=bool)
                    mask[y0:y1, x0:x1] = True
                    masks.append([{"size": [height, width], "counts": mask_to_rle_counts(mask)}])
            texts = [list(MMUD_OBJECTS[k]) for k in range(count)]
            enriched = (
                "##Question: which object is left of the circle ?\n##Answer:<SEP>the square <LCL-2> is left of "
                "<LCL-1> and <LCL-2> is red ."
            )
            caption = f"a picture with {count} objects"
            rows.append(
                (
                    f"D:\\MMUD\\MergedImages\\{name}",
                    caption,
                    enriched,
                    texts,
                    masks,
                    boxes,
                    height,
                    width,
                    [1] * count,
                    ["thing"] * count,
                    len(caption.split()),
                    len(enriched.split()),
                )
            )
        with open(root / f"{split}.pkl", "wb") as f:
            pickle.dump(rows, f)
    return root


def one_thread():
    """Fixture body: torch on one thread (the CI machine has 2 shared cores; tiny models run ~30x slower with
    oversubscribed threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
