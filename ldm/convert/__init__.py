"""Conversion above the models: file layouts, architecture inference, building and loading the full model.

    model = load_model(None, "sd-v1-5.safetensors")          # config inferred (or read from the file), strict
    sd = normalize_state_dict(ldm.io.read_state_dict(path)[0])  # SD layout -> this project's names

Files are read and written by :mod:`ldm.io` (below the models); this package maps their names and architectures
onto :mod:`ldm.models`. A config stored in a file is data: :func:`check_stored_config` allows only the project's
own model classes.
"""
from ldm.convert.architecture import STORED_TARGET_MODULES, STORED_TARGETS, check_stored_config, infer_config
from ldm.convert.build import build_model, load_model, load_text_encoder_weights, load_weights
from ldm.convert.layouts import (EMA_PREFIX, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX,
                                 convert_hf_clip_text_state_dict, normalize_state_dict, text_encoder_state_dict,
                                 to_hf_clip_text_state_dict, to_sd_file_layout)

__all__ = [
    "EMA_PREFIX", "SD1_TEXT_PREFIX", "SD2_TEXT_PREFIX", "UNET_PREFIX", "STORED_TARGET_MODULES", "STORED_TARGETS",
    "build_model", "check_stored_config", "convert_hf_clip_text_state_dict", "infer_config",
    "load_model", "load_text_encoder_weights", "load_weights", "normalize_state_dict", "text_encoder_state_dict",
    "to_hf_clip_text_state_dict", "to_sd_file_layout",
]
