"""The one base of every error cnt_lens raises on purpose: :class:`CntLensError`.

Each specific error also keeps the built-in base it always had (``ValueError``, ``TypeError``,
``RuntimeError``), so ``except ValueError`` goes on catching what it caught; ``except CntLensError``
catches every expected failure of the library (bad input, damaged files, incompatible models) and
none of its bugs. The command line prints these as one message, without a traceback (``--debug``
shows it).

Example:
    >>> from cnt_lens import PromptFileError
    >>> issubclass(PromptFileError, CntLensError) and issubclass(PromptFileError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["CntLensError"]


class CntLensError(Exception):
    """An expected failure: its message names the input (file, field, setting or model) and the fix."""
