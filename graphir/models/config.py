"""ModelConfig and its config.json front end, as the rest of the project imports them.

The schema, its validation and the derived facts are graphir.models.config_schema; reading a
transformers config.json (and the keys GGUF metadata maps to) is graphir.models.config_hf;
the strict key readers and ConfigError are graphir.models.config_keys.
"""

from __future__ import annotations

from graphir.models.config_hf import MODEL_TYPES, from_hf_dict
from graphir.models.config_keys import ConfigError
from graphir.models.config_schema import HYBRID, LAYER_TYPES, MAX_LAYERS, SIGMOID_ROUTED, Arch, ModelConfig

__all__ = ["HYBRID", "LAYER_TYPES", "MAX_LAYERS", "MODEL_TYPES", "SIGMOID_ROUTED", "Arch", "ConfigError", "ModelConfig",
           "from_hf_dict"]
