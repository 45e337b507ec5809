"""Text: tokenizers, exact streaming detokenization, pre- and postprocessing logic.

May import: wire.
"""
