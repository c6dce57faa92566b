"""Converters from official releases' checkpoints to vgstudy models (`vgstudy.convert.hivg`,
`vgstudy.convert.mapper`, `vgstudy.convert.transvg`): every key mapped, or a CheckpointError listing what is missing,
unexpected or mis-shaped."""
