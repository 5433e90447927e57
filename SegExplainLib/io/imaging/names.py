"""File and volume names: the stem of an image file, and which name holds which sequence."""

from __future__ import annotations

from collections.abc import Sequence

from .writing import WRITE_SUFFIXES


def image_stem(name: str) -> str | None:
    """A file name without its image ending (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``), or None without one.

    Case folders name their files after the sequences, so the stem is the sequence name.

    Example:
        >>> image_stem("T1-20s.nii.gz"), image_stem("notes.txt")
        ('T1-20s', None)
    """
    return next((name[:-len(s)] for s in WRITE_SUFFIXES if name.endswith(s)), None)


def _name_key(text: str) -> str:
    return text.strip(" _-:.").lower()


def _holds(key: str, name: str) -> bool:
    """Whether a name key equals a sequence key, or ends with it after a separator (``case7_t2`` holds ``t2``)."""
    return key == name or (key.endswith(name) and not key[:-len(name)][-1:].isalnum())


def sequence_of(name: str, sequences: Sequence[str]) -> list[int]:
    """The sequences a name (a file stem, a volume name) holds: the longest sequence names it equals or ends with.

    Case and surrounding ``" _-:."`` are ignored, and an ending counts only after a separator, so ``case_T1-120s``
    holds ``T1-120s`` (not ``120s``) and ``case_xT1`` holds no ``T1``. More than one index means the sequence names
    themselves cannot be told apart (``T2`` and ``t2``).

    Example:
        >>> sequence_of("case_1000_T1-120s", ["T2", "120s", "T1-120s"]), sequence_of("case_T1c", ["T1"])
        ([2], [])
    """
    key = _name_key(name)
    lengths = [len(_name_key(s)) if _holds(key, _name_key(s)) else 0 for s in sequences]
    longest = max(lengths, default=0)
    return [i for i, length in enumerate(lengths) if longest and length == longest]


def match_names(candidates: Sequence[str], wanted: Sequence[str]) -> list[int | None]:
    """Which candidate (a file stem, a volume name) holds each wanted sequence name; each candidate is used once.

    A candidate equal to the name wins (case and surrounding ``" _-:."`` ignored); then one that ends with the name
    after a separator, so ``case7_T2`` holds ``T2`` while ``case7_T1-20s`` does not hold ``T1``.

    Args:
        candidates: For example the stems of a case folder's files, ``["case7_T1", "case7_T2", "case7_label"]``.
        wanted: The model card's sequence names in channel order, e.g. ``["T2", "T1"]``.

    Returns:
        For each wanted name, the index of its candidate, or None where none matches.

    Example:
        >>> match_names(["4: T2", "case7_T1-20s", "case7_T1"], ["T1", "T2", "ADC"])
        [2, 0, None]
    """
    keys = [_name_key(c) for c in candidates]

    def same(key: str, name: str) -> bool:
        return key == name

    chosen: list[int | None] = [None] * len(wanted)
    for matches in (same, _holds):
        for index, name in enumerate(wanted):
            if chosen[index] is None:
                chosen[index] = next((i for i, key in enumerate(keys)
                                      if i not in chosen and matches(key, _name_key(name))), None)
    return chosen
