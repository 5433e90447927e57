"""Image files and physical coordinates: the file layer of the command line ``segexplain explain``.

MRI sequences and label maps are read with SimpleITK (NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``, MetaImage
``.mha``/``.mhd`` and whatever else it reads) into arrays shaped like the engine's input, (C, D, H, W) = (channel,
z, y, x), together with the :class:`Geometry` of the grid (spacing, origin, direction, size in ITK's x, y, z order).
Relevance maps are written back with exactly that geometry, so that they overlay the images in Slicer or ITK-SNAP.

Nothing is resampled unless ``resample=True`` is passed; a sequence on another grid is an error that names the file
and the field that differs. Every file's header is read and checked first: its size against :data:`MAX_VOXELS` and
its grid against the others', before any voxel is decoded (a gzip-compressed file of 1 MB can hold 1000^3 voxels,
gigabytes once decoded). Physical points can be given in LPS (ITK, DICOM) or RAS (Slicer, NIfTI viewers); RAS is
LPS with the first two coordinates negated.

Example:
    >>> image, geometry = read_sequences(["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"])
    >>> image.shape                                   # (C, D, H, W)
    (4, 155, 240, 240)
    >>> lesion = read_label("seg.nii.gz", geometry)   # (D, H, W) integer labels on the same grid
    >>> index = physical_to_index((-12.5, 30.0, 8.0), geometry, frame="ras")   # a point clicked in Slicer
    >>> write_maps(result.maps, geometry, "out", ["t1", "t1ce", "t2", "flair"])  # out/relevance_t1.nii.gz, ...

The package holds a module per subject: :mod:`.geometry`, :mod:`.headers` (the checks before decoding),
:mod:`.reading`, :mod:`.writing`, :mod:`.coordinates` and :mod:`.names`.
"""

from .coordinates import FRAMES, Frame, box_to_index, index_to_physical, physical_to_index
from .geometry import Geometry
from .headers import MAX_VOXELS, SELF_CONTAINED_HEADER_BYTES, check_self_contained
from .names import image_stem, match_names, sequence_of
from .reading import read_geometry, read_label, read_sequences
from .writing import WRITE_SUFFIXES, write_maps, write_volume

__all__ = [
    "MAX_VOXELS",
    "SELF_CONTAINED_HEADER_BYTES",
    "WRITE_SUFFIXES",
    "FRAMES",
    "Frame",
    "Geometry",
    "box_to_index",
    "check_self_contained",
    "image_stem",
    "index_to_physical",
    "match_names",
    "physical_to_index",
    "read_geometry",
    "read_label",
    "read_sequences",
    "sequence_of",
    "write_maps",
    "write_volume",
]
