"""Model code: the CoAtNet family, its registry and factory. Never imports the training side."""

from .coatnet import CoAtNet, CoAtNetConfig, MBConv, RelativeAttention, StageConfig, TransformerBlock
from .factory import create_model, load_weights, read_state_dict
from .registry import PaperFigures, list_models, model_entry, register_model

__all__ = ["CoAtNet", "CoAtNetConfig", "StageConfig", "MBConv", "RelativeAttention", "TransformerBlock",
           "create_model", "load_weights", "read_state_dict", "PaperFigures", "list_models", "model_entry",
           "register_model"]
