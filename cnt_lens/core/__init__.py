"""The core layer: errors, atomic files, the edit journal, progress, timing, statistics and records.

Nothing here knows about models; every other layer may import it.
"""
