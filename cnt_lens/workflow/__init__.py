"""The workflow layer: a transfer computed, its run directory written, and planted pairs for tests.

:mod:`~cnt_lens.workflow.pipeline` computes, :mod:`~cnt_lens.workflow.runs` writes the run directory,
:mod:`~cnt_lens.workflow.testing` builds planted pairs.
"""
