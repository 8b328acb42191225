"""Datasets: converters to sharded Parquet records, the record format, the synthetic default."""

from mpformer_ray.data.records import (
    ConversionReport,
    DataError,
    decode_row,
    make_row,
    read_manifest,
    read_records,
    write_dataset,
)
from mpformer_ray.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic, generate_scene, generate_scenes

__all__ = [
    "SYNTHETIC_CLASSES",
    "ConversionReport",
    "DataError",
    "decode_row",
    "ensure_synthetic",
    "generate_scene",
    "generate_scenes",
    "make_row",
    "read_manifest",
    "read_records",
    "write_dataset",
]
