"""The one exception autocut raises for every refusal."""

__all__ = ["CutError", "first_line"]


class CutError(ValueError):
    """autocut cannot cut this model as asked.

    The message says what was wrong and what to pass instead (an explicit ``cut=``, another
    ``input_size=``, ...). It is a :class:`ValueError`, so ``except ValueError`` catches it too.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for quoting it inside another one."""
    text = str(err)
    return text.splitlines()[0] if text else ""
