"""The one exception autocut raises for every refusal."""

__all__ = ["CutError"]


class CutError(ValueError):
    """autocut cannot cut this model as asked.

    The message says what was wrong and what to pass instead (an explicit ``cut=``, another
    ``input_size=``, ...). It is a :class:`ValueError`, so ``except ValueError`` catches it too.
    """
