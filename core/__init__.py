"""DRF (Distribution-based feature Recovery and Fusion): the model, its encoders, training and evaluation."""
