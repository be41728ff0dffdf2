"""Datasets: readers for MVTec AD, VisA, Magnetic Tile, folders and synthetic libraries."""

from anomalyfleet.data.dataset import AnomalyDataset
from anomalyfleet.data.readers import KNOWN_KINDS, parse_data_spec, parse_data_specs
from anomalyfleet.data.samples import Sample

__all__ = ["AnomalyDataset", "KNOWN_KINDS", "Sample", "parse_data_spec", "parse_data_specs"]
