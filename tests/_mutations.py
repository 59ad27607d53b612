"""A hypothesis strategy shared by the parser tests: bytes, slightly broken."""

from __future__ import annotations

from hypothesis import strategies as st

ANY_CHUNK = st.binary(min_size=1, max_size=4)


@st.composite
def mutated(
    draw: st.DrawFn,
    base: bytes,
    chunks: st.SearchStrategy[bytes] = ANY_CHUNK,
    max_edits: int = 4,
) -> bytes:
    """`base` with up to `max_edits` chunks inserted, deleted or replaced."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, max_edits))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(chunks)
        if action == "insert":
            data[at:at] = chunk
        elif action == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at : at + len(chunk)] = chunk
    return bytes(data)
