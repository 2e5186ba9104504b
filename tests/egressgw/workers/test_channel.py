"""The supervisor-worker wire format: frames survive any split of the stream, and bad data fails."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.workers.channel import (
    EVENT,
    MAX_FRAME,
    MESSAGE,
    Decoder,
    FrameError,
    decode_message,
    frame,
    message,
)

frames_st = st.lists(
    st.tuples(st.sampled_from([EVENT, MESSAGE]), st.binary(max_size=300)), max_size=30
)


@given(frames_st, st.lists(st.integers(min_value=1, max_value=64), min_size=1))
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(
    frames: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    """Reads of any sizes give back every frame once, in order, and keep no byte."""
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    decoder, out, pos, i = Decoder(), [], 0, 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        out.extend(decoder.feed(stream[pos : pos + size]))
        pos, i = pos + size, i + 1
    assert out == frames
    assert decoder.pending == 0


@given(frames_st, st.integers(min_value=1, max_value=400))
def test_a_cut_short_last_frame_is_held_not_delivered(
    frames: list[tuple[int, bytes]], missing: int
) -> None:
    """A frame whose end never came (its sender died) is not delivered, the ones before are."""
    stream = b"".join(frame(k, p) for k, p in frames) + frame(EVENT, b"x" * 400)[:-missing]
    decoder = Decoder()
    assert decoder.feed(stream) == frames
    assert decoder.pending == 405 - missing


def test_a_bad_kind_or_length_is_an_error() -> None:
    """A stream that does not hold frames is refused rather than read as garbage events."""
    with pytest.raises(FrameError, match="kind 9"):
        Decoder().feed(b"\x00\x00\x00\x01\x09x")
    with pytest.raises(FrameError, match="length"):
        Decoder().feed((MAX_FRAME + 1).to_bytes(4, "big") + bytes([EVENT]))


def test_messages_round_trip_and_need_an_op() -> None:
    """A control message is a JSON object with an op; anything else is an error."""
    [(kind, payload)] = Decoder().feed(message("reload", id=3))
    assert kind == MESSAGE
    assert decode_message(payload) == {"op": "reload", "id": 3}
    with pytest.raises(FrameError):
        decode_message(b"[1]")
    with pytest.raises(FrameError):
        decode_message(b"{not json")
