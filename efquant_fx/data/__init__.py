"""Fine-tuning data: folder / list-file / RecordIO datasets, subset selection, P x K sampling.

Entry point: :func:`build_dataset` (recipe ``data:`` mapping -> ``(dataset, DataReport)``).
"""

from efquant_fx.data.base import FaceDataset, validate_entries
from efquant_fx.data.build import DATASET_KINDS, build_dataset, register_dataset_kind
from efquant_fx.data.folder import ImageFolderDataset
from efquant_fx.data.listfile import ListFileDataset
from efquant_fx.data.recordio import RecordIODataset, RecordIOReader, write_recordio
from efquant_fx.data.report import DataReport
from efquant_fx.data.sampler import IdentityBalancedBatchSampler
from efquant_fx.data.subset import Subset, select_subset
from efquant_fx.data.transforms import FaceTransform, UnreadableImage, decode_image

__all__ = [
    "DATASET_KINDS",
    "DataReport",
    "FaceDataset",
    "FaceTransform",
    "IdentityBalancedBatchSampler",
    "ImageFolderDataset",
    "ListFileDataset",
    "RecordIODataset",
    "RecordIOReader",
    "Subset",
    "UnreadableImage",
    "build_dataset",
    "decode_image",
    "register_dataset_kind",
    "select_subset",
    "validate_entries",
    "write_recordio",
]
