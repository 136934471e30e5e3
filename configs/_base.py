"""Helpers shared by the config files: the default schema and named model sizes.

Config files build on :func:`repeat_scaling.train.config.default_config`; the model
fields come from :func:`repeat_scaling.train.config.model_fields` so that every field is
overridable on the command line (``--config.model.dropout_rate=0.1``).
"""

from repeat_scaling.models.config import padded_vocab_size
from repeat_scaling.train.config import adafactor_t5, adamw, default_config, model_fields

#: The byte vocabulary (ids = byte + 3, 100 extra ids): 359 ids, padded to 384 rows.
BYTE_VOCAB_SIZE = padded_vocab_size(259 + 100)


def finetune_sweep(sources, entry) -> list[dict]:
    """A fine-tuning stage's sweep: one from-scratch run per model, then every source run
    fine-tuned (``entry(run, **extra)`` builds one sweep entry).

    ``init_from`` is the source's ``{root}/<pre-training run name>`` workdir:
    launch/sweeps.py fills in the root.
    """
    first = {}  # one from-scratch run per model
    for r in sources:
        first.setdefault(r.config.model.name, r)
    sweep = [entry(r) for r in first.values()]
    sweep += [entry(r, seed=r.config.seed, init_from=r.workdir) for r in sources]
    return sweep


__all__ = [
    "BYTE_VOCAB_SIZE",
    "adafactor_t5",
    "adamw",
    "default_config",
    "finetune_sweep",
    "model_fields",
]
