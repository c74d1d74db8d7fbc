"""Model code: the CoAtNet family, its registry and factory, the model folder format.

Never imports the training side (training, data, checkpoints): ``tests/test_models.py`` checks it.
"""

from .coatnet import (CoAtNet, CoAtNetConfig, HeadConfig, MBConv, MBConvConfig, RelativeAttention, StageConfig,
                      StemConfig, TransformerBlock, TransformerConfig)
from .fast_path import compile_for_inference
from .factory import create_model, from_pretrained, load_weights, read_state_dict
from .folder import save_pretrained
from .preprocessing import PretrainedCfg, data_transforms
from .registry import PaperFigures, is_model, list_models, model_entry, register_model
from .timm_convert import convert_timm_state_dict, timm_variants

__all__ = ["CoAtNet", "CoAtNetConfig", "StemConfig", "MBConvConfig", "TransformerConfig", "HeadConfig", "StageConfig",
           "MBConv", "RelativeAttention", "TransformerBlock", "PretrainedCfg", "data_transforms",
           "compile_for_inference", "create_model", "load_weights", "read_state_dict", "from_pretrained",
           "save_pretrained", "convert_timm_state_dict", "timm_variants", "PaperFigures", "is_model", "list_models",
           "model_entry", "register_model"]
