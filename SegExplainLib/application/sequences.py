"""Which input holds which sequence of the model: the one matcher of file names and volume names.

A shell sorts ``case_1000_T[12]*.nii.gz`` by name, not in the model's order; a scene lists its volumes in the order
they were loaded. :func:`match_sequences` reads the sequence from each input's name (``case_1000_T1-120s`` holds
``T1-120s``, see :func:`~SegExplainLib.io.imaging.sequence_of`) and puts the inputs in the model's order, refuses names
that contradict the order given, and says when the order was taken as given because the names do not tell. The case
run (file names), the cohort (each case), the Slicer module and the review app (volume names, case folders) use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SegExplainError
from ..io.imaging import image_stem, sequence_of

#: ``summary.json``'s ``sequence_order``: the inputs were put in the model's order by their names.
BY_NAME = "matched by name"
#: ``summary.json``'s ``sequence_order``: the names do not say which input holds which sequence.
AS_GIVEN = "taken as given"


@dataclass(frozen=True)
class SequenceMatch:
    """Which input holds each sequence of the model.

    Attributes:
        sequences: The model's sequence names, in its order.
        inputs: The inputs' names as given.
        order: For each sequence, the index of its input.
        by_name: Whether the names said it (else the order given was kept: :data:`AS_GIVEN`).
    """

    sequences: tuple[str, ...]
    inputs: tuple[str, ...]
    order: tuple[int, ...]
    by_name: bool

    @property
    def reordered(self) -> bool:
        """Whether the inputs were given in another order than the model's."""
        return self.order != tuple(range(len(self.order)))

    def ordered(self, items: Sequence[Any]) -> list[Any]:
        """``items`` (one per input, as given) in the model's order."""
        return [items[i] for i in self.order]

    def pairs(self) -> str:
        """``name -> sequence, ...`` in the model's order."""
        return ", ".join(f"{self.inputs[i]} -> {name}" for name, i in zip(self.sequences, self.order))

    def message(self) -> str | None:
        """The line that says the inputs were reordered, or None when they were not."""
        return f"inputs put in the model's order by their names: {self.pairs()}" if self.reordered else None

    def record(self, ordered: Sequence[str] | None = None) -> dict[str, Any]:
        """The entries of ``summary.json``: how the order was found, and which input went to which sequence
        (``ordered``: what to call the inputs, in the model's order, e.g. their file names; default their names)."""
        return {"sequence_order": BY_NAME if self.by_name else AS_GIVEN,
                "sequence_inputs": dict(zip(self.sequences, ordered or self.ordered(self.inputs)))}


def input_name(path: str | Path) -> str:
    """The name of a file input that :func:`match_sequences` reads: its file name without the image ending."""
    name = Path(path).name
    return image_stem(name) or name


def match_sequences(names: Sequence[str], sequences: Sequence[str], *, given_order: bool) -> SequenceMatch:
    """Which of ``names`` (file stems, volume names) holds each of the model's ``sequences``.

    Args:
        names: One per input.
        sequences: The model's sequence names, in its order.
        given_order: Whether the order of ``names`` is the user's (``--input`` files, a CSV row): it is kept when the
            names do not tell, and a name that contradicts it is refused unless every name tells. False where the order
            means nothing (a folder's files): every sequence must then be named by one input.

    Returns:
        The match; ``by_name`` when every input named its sequence.

    Raises:
        SegExplainError: A count other than the model's sequences, two inputs naming one sequence, sequence names
            that cannot be told apart, names that contradict the order given, or (without ``given_order``) a sequence
            that no input names.
    """
    names, sequences = tuple(map(str, names)), tuple(map(str, sequences))
    held = [sequence_of(name, sequences) for name in names]
    matched = {i: found[0] for i, found in enumerate(held) if len(found) == 1}

    def found() -> str:
        return "; matched: " + (", ".join(f"{names[i]} -> {sequences[s]}" for i, s in matched.items()) or "none")

    expected = f"the model's {len(sequences)} sequences, in order: {', '.join(sequences)}"
    if len(names) != len(sequences):
        raise SegExplainError(f"{len(names)} inputs ({', '.join(names)}) for {expected}{found()}")
    alike = next((found for found in held if len(found) > 1), None)
    if alike:
        raise SegExplainError(f"the sequence names {', '.join(sequences[s] for s in alike)} cannot be told apart "
                              "by name")
    for sequence in sorted(set(matched.values())):
        holders = [names[i] for i, s in matched.items() if s == sequence]
        if len(holders) > 1:
            raise SegExplainError(f"{' and '.join(holders)} both name the sequence {sequences[sequence]}; "
                                  f"{expected}")
    if len(matched) == len(names):
        return SequenceMatch(sequences, names, tuple(sorted(matched, key=matched.get)), by_name=True)
    if not given_order:
        missing = [s for index, s in enumerate(sequences) if index not in matched.values()]
        raise SegExplainError(f"no input named after {', '.join(missing)}: {expected}{found()}")
    contradicting = [f"{names[i]} (given as {sequences[i]})" for i, s in matched.items() if s != i]
    if contradicting:
        raise SegExplainError(f"the names of {', '.join(contradicting)} contradict the order given; give the inputs "
                              f"in {expected}, or name every file after its sequence{found()}")
    return SequenceMatch(sequences, names, tuple(range(len(names))), by_name=False)
