"""The paper's CoorTransformer-based landmark detector (Section IV, Fig. 4) on the coorkern ops.

:class:`CoorDetector` is a U-Net whose decoder stages end in :class:`CoorTransformerBlock`
stages; their attention is coordinate-indexed attention (:func:`coorkern.coor_attention`
at the coordinates a :class:`CoordinateModule` predicts) or one of the paper's Table IV
baselines on the same tokens.  Nothing here materializes an ``N x N`` attention matrix.
``python -m coorkern.models --summary`` prints the parameter count, an activation-memory
estimate and the attention tokens per stage.  The modules:

* :mod:`.blocks` -- token <-> map reshapes, :func:`reference_grid`, conv/CBAM/decoder blocks;
* :mod:`.coordinates` -- :class:`CoordinateModule`;
* :mod:`.positions` -- positions added to Q/K before sampling (coordinate-index features);
* :mod:`.attention` -- :class:`TokenAttention` (coor, deformable, vanilla), :class:`WindowAttention` (swin);
* :mod:`.transformer` -- :class:`CoorTransformerBlock`;
* :mod:`.detector` -- :class:`CoorDetector`;
* :mod:`.summary` -- :func:`summary` and the ``--summary`` command line.

The design and the readings of the paper's coordinate module: docs/design/detector.md.
"""

from .attention import ATTENTION_KINDS, TokenAttention, WindowAttention
from .blocks import CBAM, ConvBNReLU, DecoderStage, LayerNorm2d, map_to_tokens, reference_grid, tokens_to_map
from .coordinates import COORD_MODES, COORD_SOURCES, CoordinateModule
from .detector import DEFAULT_POSITIONS, POSITIONS, TRANSFORMER_KINDS, VANILLA_POSITIONS, CoorDetector
from .positions import POSITION_KINDS, GridPosition, SinCosPosition, sincos_2d
from .summary import ModelSummary, _main, summary  # noqa: F401 (_main: coorkern.models._main(argv) as before)
from .transformer import CoorTransformerBlock

__all__ = [
    "ATTENTION_KINDS",
    "CBAM",
    "COORD_MODES",
    "COORD_SOURCES",
    "ConvBNReLU",
    "CoordinateModule",
    "CoorDetector",
    "CoorTransformerBlock",
    "DecoderStage",
    "GridPosition",
    "LayerNorm2d",
    "ModelSummary",
    "DEFAULT_POSITIONS",
    "POSITIONS",
    "POSITION_KINDS",
    "SinCosPosition",
    "TRANSFORMER_KINDS",
    "TokenAttention",
    "VANILLA_POSITIONS",
    "WindowAttention",
    "map_to_tokens",
    "reference_grid",
    "sincos_2d",
    "summary",
    "tokens_to_map",
]
