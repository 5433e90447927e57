"""Observers that follow a node reference: an event of whichever node a reference points to, as the reference changes.

The module's parameter node holds its nodes as references (``clickedPoints`` is one); a loaded scene, Undo or a
script can point a reference at another node at any time. Imports only vtk, so the module widget uses it before the
engine's packages are installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import vtk


class ReferenceObserver:
    """Calls ``callback(caller, event)`` on ``event`` of the node that ``node``'s ``role`` reference points to.

    The reference is read again whenever ``node`` is modified (a reference set, changed or removed, or its node
    removed from the scene): the old node is no longer observed, the new one is, and ``onChanged(newNode or None)``
    is called. :meth:`close` removes every observer.

    Example:
        >>> observer = ReferenceObserver(parameterNode, "clickedPoints",
        ...                              slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, onPointClicked,
        ...                              onChanged=placeWidget.setCurrentNode)
        >>> observer.close()  # the module is left
    """

    def __init__(self, node: Any, role: str, event: int, callback: Callable[[Any, Any], None], *,
                 onChanged: Callable[[Any], None] | None = None) -> None:
        self.node, self.role, self.event = node, role, event
        self.callback, self.onChanged = callback, onChanged
        self.referenced, self._tag = None, None
        self._nodeTag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._follow)
        self._follow()

    def _follow(self, *unused: object) -> None:
        referenced = self.node.GetNodeReference(self.role)
        if referenced is self.referenced:
            return
        self._stopObserving()
        self.referenced = referenced
        if referenced is not None:
            self._tag = referenced.AddObserver(self.event, self.callback)
        if self.onChanged is not None:
            self.onChanged(referenced)

    def _stopObserving(self) -> None:
        if self.referenced is not None and self._tag is not None:
            self.referenced.RemoveObserver(self._tag)
        self.referenced, self._tag = None, None

    def close(self) -> None:
        """Stop observing the referenced node and the node holding the reference (idempotent)."""
        self._stopObserving()
        if self._nodeTag is not None:
            self.node.RemoveObserver(self._nodeTag)
            self._nodeTag = None
