"""Data for calibration and fine-tuning: every ``data.kind`` in one registry, built by one builder.

Registry (:mod:`efquant_fx.datakinds`): :func:`register_dataset_kind`, :func:`list_dataset_kinds`,
:func:`get_dataset_kind`. Builder (:mod:`efquant_fx.data.build`): :func:`build_data` (recipe ``data:``
mapping -> ``(dataset, DataReport)``). Importing this package registers the built-in kinds: folder,
list, recordio (read images; subset selection, validation, P x K sampling), random and synthetic.
"""

from efquant_fx.data.base import FaceDataset, validate_entries
from efquant_fx.data.build import build_data, build_dataset
from efquant_fx.data.folder import ImageFolderDataset
from efquant_fx.data.listfile import ListFileDataset
from efquant_fx.data.random import RandomFaceDataset, RandomImages
from efquant_fx.data.recordio import RecordIODataset, RecordIOReader, write_recordio
from efquant_fx.data.report import DataReport
from efquant_fx.data.sampler import IdentityBalancedBatchSampler
from efquant_fx.data.subset import Subset, select_subset
from efquant_fx.data.synthetic import SyntheticDataset
from efquant_fx.data.transforms import FaceTransform, UnreadableImage, decode_image
from efquant_fx.datakinds import (
    DATASET_KINDS,
    BuildContext,
    DatasetKind,
    get_dataset_kind,
    is_dataset_kind,
    list_dataset_kinds,
    register_dataset_kind,
    unregister_dataset_kind,
)

__all__ = [
    "DATASET_KINDS",
    "BuildContext",
    "DataReport",
    "DatasetKind",
    "FaceDataset",
    "FaceTransform",
    "IdentityBalancedBatchSampler",
    "ImageFolderDataset",
    "ListFileDataset",
    "RandomFaceDataset",
    "RandomImages",
    "RecordIODataset",
    "RecordIOReader",
    "Subset",
    "SyntheticDataset",
    "UnreadableImage",
    "build_data",
    "build_dataset",
    "decode_image",
    "get_dataset_kind",
    "is_dataset_kind",
    "list_dataset_kinds",
    "register_dataset_kind",
    "select_subset",
    "unregister_dataset_kind",
    "validate_entries",
    "write_recordio",
]
