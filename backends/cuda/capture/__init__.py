"""The decode step captured in CUDA graphs (decode_step.py: `DecodeStep`, `decode_schedule`): the
decode graph over a fixed cache bucket, cut into device segments at copies and all-reduces,
each captured once per bucket and replayed per token; without CUDA it runs eagerly.
"""
