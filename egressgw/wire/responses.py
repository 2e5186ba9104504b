"""The gateway's own HTTP answers: refusals and errors, one line of text each."""

from __future__ import annotations

from http import HTTPStatus

REASON_HEADER = "X-Egressgw-Reason"


def _header_safe(text: str) -> str:
    cleaned = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return cleaned[:512]


def to_error_response(status: int, reason: str, close: bool = False) -> bytes:
    """A complete HTTP/1.1 response with the reason in a header and a one-line body."""
    phrase = HTTPStatus(status).phrase
    safe = _header_safe(reason)
    body = f"egressgw: {status} {phrase}: {safe}\n".encode("ascii")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"{REASON_HEADER}: {safe}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
    )
    return head.encode("ascii") + body


CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
