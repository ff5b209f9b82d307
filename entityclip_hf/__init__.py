"""EntityCLIP for the Hugging Face ecosystem.

Importing the package registers EntityCLIP with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForZeroShotImageClassification`, `AutoProcessor`), so `AutoModel.from_pretrained(folder)` works without `trust_remote_code` when it is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .configuration_entityclip import EntityCLIPConfig
from .modeling_entityclip import EntityCLIPModel, EntityCLIPOutput
from .processing_entityclip import EntityCLIPProcessor

AutoConfig.register(EntityCLIPConfig.model_type, EntityCLIPConfig)
AutoModel.register(EntityCLIPConfig, EntityCLIPModel)
# pipeline("zero-shot-image-classification") looks the model up here; forward scores N images x M texts as CLIP's.
AutoModelForZeroShotImageClassification.register(EntityCLIPConfig, EntityCLIPModel)
AutoProcessor.register(EntityCLIPConfig, EntityCLIPProcessor)
# save_pretrained then writes `auto_map` and copies the model's code files beside the weights, so that users
# without this package can load with `trust_remote_code=True`.
EntityCLIPConfig.register_for_auto_class()
EntityCLIPModel.register_for_auto_class("AutoModel")

__all__ = ["EntityCLIPConfig", "EntityCLIPModel", "EntityCLIPOutput", "EntityCLIPProcessor"]
