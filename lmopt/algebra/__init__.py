"""The math of merging, separate from graphs: linear layers as ConvSpec/DenseSpec, their
composition and sums (linear), least-squares refits (refit), low-rank factors (lowrank)."""
