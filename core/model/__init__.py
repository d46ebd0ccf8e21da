"""``DRFModel``: the encoders, their projections to the DRF width and the DRF head; ``create_model`` by name."""

from core.model.drf_model import ABLATIONS, DEFAULT_DIM, DRFModel, FeatureTable, PreparedBatch, create_model

__all__ = ["ABLATIONS", "DEFAULT_DIM", "DRFModel", "FeatureTable", "PreparedBatch", "create_model"]
