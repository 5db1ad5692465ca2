"""Test-time mirror averaging: the default number of passes and which mirrors they are.

Kept free of torch so that the command line can show its defaults without loading it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TTA", "tta_flips"]

#: Mirror averaging is on unless turned off (``--no-tta``, the panel's checkbox): two
#: passes, the image and its half turn. Chosen on the validation split (issue #16): the
#: second-generation model with 2 passes scores at least what the first did with 4
#: (H&E objective 0.525 vs 0.522, fluorescence 0.752 vs 0.750) at about half the model
#: time; 4 passes add +0.005 H&E (``--tta 4``). Sliders never re-run the model.
DEFAULT_TTA: int = 2


#: Test-time flips: (flip rows, flip columns) for the four variants averaged with ``tta``.
_FLIPS = ((False, False), (False, True), (True, False), (True, True))


def tta_flips(tta: bool | int) -> tuple[tuple[bool, bool], ...]:
    """The mirror passes of a ``tta`` setting: False / 1 the image only, 2 the image and
    its 180° rotation (both axes flipped), True / 4 all four mirror images."""
    n = 4 if tta is True else 1 if tta is False else int(tta)
    if n not in (1, 2, 4):
        raise ValueError(f"tta must be 1, 2 or 4 mirror passes, got {tta!r}")
    return _FLIPS if n == 4 else (_FLIPS[0], _FLIPS[3]) if n == 2 else _FLIPS[:1]
