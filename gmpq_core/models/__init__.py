"""Model registry: ``build_model(name, num_classes=..., in_channels=..., small_input=...)``."""
from .registry import MODELS, ModelSpec, build_model, gradcam_layer_name, list_models, register_model

__all__ = ["MODELS", "ModelSpec", "build_model", "list_models", "register_model", "gradcam_layer_name"]
