"""Per-example randomness of the objectives: example ``i`` draws from
``Generator(Philox(key=(seed << 64) | slot_i))``, so any batch can be rebuilt from its slots
and seed; ``SlotRng`` rewinds one Philox instead of building a generator per example.
"""

from __future__ import annotations

import numpy as np

from repeat_scaling.data.features import ObjectiveError


def example_rng(seed: int, slot: int) -> np.random.Generator:
    """The generator of one example: Philox keyed by the 128-bit value (seed, slot)."""
    return np.random.Generator(np.random.Philox(key=(int(seed) << 64) | int(slot)))


class SlotRng:
    """Reusable :func:`example_rng`: ``reset(seed, slot)`` rewinds one Philox to that key.

    Gives exactly the stream of ``example_rng(seed, slot)`` at a sixth of the cost of
    building a new generator; the returned generator is valid until the next ``reset``.
    """

    def __init__(self):
        self._bitgen = np.random.Philox(key=0)
        self._gen = np.random.Generator(self._bitgen)
        self._state = self._bitgen.state

    def reset(self, seed: int, slot: int) -> np.random.Generator:
        if not (0 <= int(seed) < 2**64 and 0 <= int(slot) < 2**64):
            raise ObjectiveError(f"seed={seed} and slot={slot} must be in [0, 2**64)")
        st = self._state
        st["state"]["counter"][:] = 0
        st["state"]["key"][:] = (int(slot), int(seed))
        st["buffer_pos"] = 4
        st["has_uint32"] = 0
        st["uinteger"] = 0
        self._bitgen.state = st
        return self._gen
