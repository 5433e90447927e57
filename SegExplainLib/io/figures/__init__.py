"""Figures of relevance maps: maximum intensity projections, slice montages, relevance shares and inclusivity.

The figures follow the papers SegExplain builds on: Chatterjee et al. show maximum intensity projections (MIPs) and
slice montages of each MRI sequence with the relevance overlaid in red (positive) and blue (negative); the liver LRP
study shows the share of the relevance that each sequence carries, over 20 test patients; Tjoa et al. (figure 4)
show the inclusivity of filtered relevance as box plots.

Every function returns a :class:`matplotlib.figure.Figure` with its own Agg canvas. Nothing here touches pyplot's
global state, so figures can be made in worker threads and on headless machines; ``fig.canvas.draw()`` followed by
``np.asarray(fig.canvas.buffer_rgba())`` gives the rendered pixels, and :func:`save_figure` writes PNG or PDF.

Overlays: the relevance is drawn with a diverging colour map (``"RdBu_r"`` by default) centred on zero, with the
symmetric limits ``±max|R|`` of each sequence (or of all sequences with ``shared_scale=True``). The opacity of a
pixel grows with ``|R|`` up to ``alpha`` at the limit, so voxels without relevance show the grey image unchanged.

Axes carry labels (``Axes.get_label()``) so that programs and tests can find them: ``"image:<name>"`` for the image
axes of a MIP, ``"image:<name>:<slice>"`` for a montage tile, ``"colorbar:<name>"`` for the colour bar of a sequence,
``"shares"`` and ``"inclusivity"`` for the charts.

Example:
    >>> result = sx.explain(unet, image, sx.PredictedRegion(class_index=1), "lrp")
    >>> names = ["T1", "T1c", "T2", "FLAIR", "DWI", "ADC"]
    >>> save_figure(mip_figure(image, result.maps, sequence_names=names), "mip.png")
    >>> save_figure(montage_figure(image, result.maps, sequence_names=names, placement="relevance"), "montage.pdf")

A case's figures, as a clinician reads them, come from :func:`explanation_figures`: one colour scale for all
sequences, a title naming method, region, class and target score, orientation letters and slice positions in mm
(docs/figures.md):

    >>> figures = explanation_figures(image, result.maps, sequence_names=names, geometry=geometry,
    ...                               record=result.record(), region=region)
    >>> for filename, figure in figures.items():                # mip.png, montage.png, shares.png
    ...     save_figure(figure, folder / filename)

The package holds a module per subject: :mod:`.projections`, :mod:`.drawing` (the overlay primitives),
:mod:`.overlays` (MIP, montage), :mod:`.charts` (shares, inclusivity), :mod:`.matrix` (the segment matrix),
:mod:`.saving` and :mod:`.checks`;
:mod:`.case` (a case's figures), :mod:`.scorecard` (the scorecard of methods), :mod:`.views` (views in the patient
frame) and :mod:`.panels` (figures drawn as one picture).
"""

from .case import explanation_figures, explanation_title, region_views, rendered_montage
from .charts import ShareKind, inclusivity_figure, shares_figure
from .matrix import segment_matrix_figure, segment_matrix_title
from .overlays import mip_figure, montage_figure
from .projections import Placement, maximum_intensity_projection, montage_slices
from .saving import save_figure
from .scorecard import scorecard_figure

__all__ = [
    "Placement",
    "ShareKind",
    "explanation_figures",
    "explanation_title",
    "inclusivity_figure",
    "maximum_intensity_projection",
    "mip_figure",
    "montage_figure",
    "montage_slices",
    "region_views",
    "rendered_montage",
    "save_figure",
    "scorecard_figure",
    "segment_matrix_figure",
    "segment_matrix_title",
    "shares_figure",
]
