"""Model code: the CoAtNet family, its registry and factory. Never imports the training side."""

from .coatnet import CoAtNet, CoAtNetConfig, MBConv, RelativeAttention, StageConfig, TransformerBlock
from .factory import create_model, load_weights, read_state_dict
from .pretrained import from_pretrained, save_pretrained
from .registry import PaperFigures, list_models, model_entry, register_model
from .timm_convert import convert_timm_state_dict, timm_variants

__all__ = ["CoAtNet", "CoAtNetConfig", "StageConfig", "MBConv", "RelativeAttention", "TransformerBlock",
           "create_model", "load_weights", "read_state_dict", "from_pretrained", "save_pretrained",
           "convert_timm_state_dict", "timm_variants", "PaperFigures", "list_models", "model_entry", "register_model"]
