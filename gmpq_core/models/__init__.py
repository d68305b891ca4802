"""Model registry: ``build_model(name, num_classes=..., in_channels=..., small_input=...)``; ``name`` is a
registered model or ``MODULE:FUNCTION`` / ``PATH.py:FUNCTION`` for a user's own builder (``imported.py``)."""
from .imported import canonical_model_name, is_import_spec, model_file_tag, model_source_digest, model_source_key
from .registry import (MODELS, ModelSpec, build_model, check_model, check_model_output, gradcam_layer_name, list_models,
                       register_model, small_input_variant)

__all__ = ["MODELS", "ModelSpec", "build_model", "list_models", "register_model", "gradcam_layer_name", "check_model",
           "canonical_model_name", "is_import_spec", "model_file_tag", "model_source_digest", "model_source_key",
           "check_model_output", "small_input_variant"]
