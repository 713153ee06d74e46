"""xpcnn.errors' helpers."""

from xpcnn.errors import add_note


class _NoAddNote(Exception):
    """An exception as Python 3.10 makes them: no ``add_note`` method."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_add_note_on_python_3_10_too():
    """xpcnn supports Python 3.10 (pyproject's requires-python), where exceptions have no
    ``add_note``: the notes go into ``__notes__`` there, in order, as 3.11's method puts them."""
    old = _NoAddNote("x")
    add_note(old, "first")
    add_note(old, "second")
    assert old.__notes__ == ["first", "second"]
    new = ValueError("x")
    add_note(new, "first")
    assert new.__notes__ == ["first"]
