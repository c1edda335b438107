"""The math of merging, separate from graphs: linear layers as ConvSpec/DenseSpec, their
composition and sums (linear), least-squares refits (refit), low-rank factors (lowrank)."""
from .linear import ConvSpec, DenseSpec
from .lowrank import LowRankSpec

# A merged layer's weights, as the rewrites take them (a least-squares refit has the same form).
LayerSpec = ConvSpec | DenseSpec | LowRankSpec
