"""Helpers shared by the config files: the default schema and named model sizes.

Config files build on :func:`repeat_scaling.train.config.default_config`; the model
fields come from :func:`repeat_scaling.train.config.model_fields` so that every field is
overridable on the command line (``--config.model.dropout_rate=0.1``).
"""

from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adafactor_t5, adamw, default_config, model_fields

#: The byte vocabulary (ids = byte + 3, 100 extra ids): 359 ids, padded to 384 rows.
BYTE_VOCAB_SIZE = padded_vocab_size(259 + 100)

__all__ = ["BYTE_VOCAB_SIZE", "adafactor_t5", "adamw", "default_config", "model_fields"]
