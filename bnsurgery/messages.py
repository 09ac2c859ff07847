"""Text that reaches a terminal: the first line of an exception, untrusted strings escaped.

Two small helpers that every module which builds a message or a text report uses, so the same
mistakes are not made in fifteen places: ``str(exc).splitlines()[0]`` raises ``IndexError`` on an
exception with an empty message, and a string read from a file (ONNX metadata, a producer name,
an error text that quotes a node name) may hold newlines or terminal escape codes that forge
lines such as ``check passed`` in a report printed to a terminal.
"""

from __future__ import annotations

__all__ = ["first_line", "printable"]

# Characters kept as they are: everything printable, plus nothing else. Newlines and tabs are
# escaped too, because an untrusted value must stay on the line it was printed on.
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def first_line(value: BaseException | str, *, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or of a string), shortened.

    An exception with an empty message yields its type name, so a message built from it never
    reads ``"got ValueError: "`` with nothing after the colon, and never raises.

    Args:
        value: An exception or a message.
        limit: Longest result in characters; longer lines end with ``...``.

    Returns:
        One line without leading or trailing white space, never empty for an exception.
    """
    text = str(value) if not isinstance(value, BaseException) else _exception_text(value)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line and isinstance(value, BaseException):
        line = type(value).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _exception_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the original error
        return type(exc).__name__


def printable(value: object, *, limit: int | None = None) -> str:
    """``value`` as text that cannot move the cursor, change colours or start a new line.

    Control characters (C0, DEL, C1, which include the ESC of terminal escape sequences) and
    the Unicode line and paragraph separators are written as Python escapes (``\\n``,
    ``\\x1b``, ``\\u2028``); everything else is kept, so ordinary names read as they are.

    Args:
        value: Any value; it is converted with ``str`` first.
        limit: Longest result in characters (``None``: no limit); longer text ends with ``...``.

    Returns:
        The escaped text.
    """
    text = str(value)
    out = []
    for char in text:
        code = ord(char)
        if char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in (0x2028, 0x2029) or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069:
            # Line separators and bidirectional overrides can reorder or break what is shown.
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = result[:max(0, limit - 3)] + "..."
    return result
