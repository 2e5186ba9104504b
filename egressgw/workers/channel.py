"""The wire format between the supervisor and a worker: length-prefixed frames (pure).

A frame is a 4-byte big-endian payload length, a 1-byte kind, then the payload: an ECS event
(``EVENT``, the JSON the exporter spools, passed through unparsed) or a control message
(``MESSAGE``, a JSON object with an ``op``). The stream is a Unix stream socket: no frame is
ever split across senders, and a frame cut short by a sender's death is dropped by the reader.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

EVENT = 1
MESSAGE = 2
HEADER = struct.Struct(">IB")
HEADER_SIZE = HEADER.size
# A gateway event is a few KB; anything near this is a corrupt stream, not an event.
MAX_FRAME = 16 * 1024 * 1024


class FrameError(ValueError):
    """The stream does not hold frames (a bad kind or an impossible length)."""


def frame(kind: int, payload: bytes) -> bytes:
    """One frame of ``kind`` carrying ``payload``."""
    return HEADER.pack(len(payload), kind) + payload


def message(op: str, **fields: Any) -> bytes:
    """A control message frame: ``{"op": op, **fields}``."""
    return frame(MESSAGE, orjson.dumps({"op": op, **fields}))


class Decoder:
    """Splits a byte stream into frames, keeping a partial one for the next read."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``, in order: (kind, payload)."""
        buf = self._buffer
        buf += data
        out: list[tuple[int, bytes]] = []
        unpack, size, end, pos = HEADER.unpack_from, HEADER_SIZE, len(buf), 0
        while end - pos >= size:
            length, kind = unpack(buf, pos)
            if kind not in (EVENT, MESSAGE) or length > MAX_FRAME:
                raise FrameError(f"bad frame header at byte {pos}: kind {kind}, length {length}")
            stop = pos + size + length
            if stop > end:
                break
            out.append((kind, bytes(buf[pos + size : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out


def decode_message(payload: bytes) -> dict[str, Any]:
    """A control message's fields; FrameError when it is not a JSON object with an ``op``."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise FrameError(f"control message is not JSON: {e}") from e
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise FrameError("control message without an op")
    return value
