"""Models from the command line: how ``segexplain explain --model SPEC`` gets a network, its weights and its inputs.

A model spec is one string:

* ``"reference"`` / ``"reference_unet"``: :func:`SegExplainLib.models.networks.reference_unet` called with ``kwargs``;
* ``"unet3d"``: :class:`SegExplainLib.models.networks.UNet3D` called with ``kwargs``;
* ``"monai:Name"``: any network in ``monai.networks.nets`` (needs MONAI), called with ``kwargs``;
* ``"torch.nn:Name"`` and ``"SegExplainLib.models:Name"``: a layer of PyTorch or a network of this project;
* ``"path/to/file.py:Name"``: a class or factory defined in a Python file, called with ``kwargs``;
* ``"package.module:Name"``: a class or factory in an importable module (``Name`` may be dotted), called with
  ``kwargs``;
* ``"pickle:path/to/model.pt"``: a whole pickled ``nn.Module``.

The first four forms run only the code of SegExplain, PyTorch and MONAI (a ``Name`` without dots that is a
network class or factory function of that package). The last three import or run code of someone else: a model
file runs when it is imported, a module runs when it is imported, and unpickling runs code stored in the file.
:func:`load_model` refuses them, before importing anything, unless the caller passes ``trust_code=True``
(``--trust-model-code`` on the command line). A model card cannot allow this itself, because cards come from other
people; :func:`untrusted_code` says what a spec would run.

Weights are a state dict in ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``, so no code runs) or
``.safetensors``. A :class:`ModelCard` (YAML or JSON) bundles the spec, its options, the weights, the MRI sequences
the network expects, its classes and the intensity normalization of every sequence.

Example:
    >>> card = ModelCard.read("models/prostate.yaml")
    >>> model = card.load_model()                        # eval mode, weights loaded
    >>> image = card.normalize(raw)                      # (C, D, H, W), one channel per card.sequences

The package holds a module per subject: :mod:`.specs` (and :func:`load_model`), :mod:`.weights`,
:mod:`.normalization`, :mod:`.cards` and :mod:`.checks`.
"""

from .cards import CARD_SUFFIXES, ModelCard
from .normalization import NORMALIZATION_KINDS, normalize
from .specs import load_model, refuse_untrusted_code, untrusted_code
from .weights import WEIGHT_SUFFIXES, load_weights

__all__ = [
    "CARD_SUFFIXES",
    "NORMALIZATION_KINDS",
    "WEIGHT_SUFFIXES",
    "ModelCard",
    "load_model",
    "load_weights",
    "normalize",
    "refuse_untrusted_code",
    "untrusted_code",
]
