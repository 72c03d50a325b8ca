"""Dataset adapters for the paper's benchmarks, reading each in its published on-disk format.

- RefCOCO / RefCOCO+ / RefCOCOg, :class:`RefCOCODataset`: ``refs(unc|umd|google).p``, ``instances.json``, COCO
  train2014 images
- UPMC-Food101, :class:`Food101Dataset`: ``texts/{train,test}_titles.csv``, ``images/{train,test}/<class>/<image>``
- SNLI-VE, :class:`SNLIVEDataset`: ``snli_ve_{train,dev,test}.jsonl``, Flickr30k images
- MMUD, :class:`MMUDDataset`: ``{train,valid,test}.pkl`` (12-tuples), ``MergedImages/``, ``CLIPGENFeatureUN/``
- CMU-MOSI / MOSEI, :class:`MSADataset`: MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl`` feature pickles

Every adapter raises :class:`DatasetError` (a ValueError) naming the file and what it expected when a file is missing
or malformed. The pickled formats (refer's refs, MMUD, MMSA's features) are read with
:mod:`mit.utils.safe_pickle`, which admits containers, strings, numbers and numpy arrays (and, for MMUD's embeddings,
torch tensors) and refuses any other global, so a downloaded file cannot run code when it is loaded.
"""

from .common import DatasetError
from .food101 import Food101Dataset
from .mmud import MMUDDataset
from .mosi import MSADataset
from .refcoco import RefCOCODataset, decode_rle, polygons_to_mask
from .snli_ve import SNLI_VE_LABELS, SNLIVEDataset

__all__ = [
    "SNLI_VE_LABELS",
    "DatasetError",
    "Food101Dataset",
    "MMUDDataset",
    "MSADataset",
    "RefCOCODataset",
    "SNLIVEDataset",
    "decode_rle",
    "polygons_to_mask",
]
