"""Stub of the C extension projections/_rowbinary.c (see avro_block.native_block)."""

from collections.abc import Sequence

def transcode(
    program: bytes,
    header: bytes,
    event_type: bytes,
    values: Sequence[bytes],
    offsets: Sequence[int],
    tail: bytes,
    occurred_min: int,
    occurred_max: int,
    /,
) -> bytes | int:
    """The RowBinary rows of `values`, or the index of the first record a check refuses."""
