"""What a CPU path derives from a layer's weights alone, kept for the next call.

A layer passes its per-dtype parameter cache (a dict it empties whenever its parameters are replaced,
``Layer._sync_params``) as ``prep``; the functional API passes nothing and derives on every call.
"""
from __future__ import annotations


def prepared(prep, key, make):
    """``make()``, kept in the caller's dict ``prep`` under ``key`` when one is given, else computed."""
    if prep is None:
        return make()
    hit = prep.get(key)
    if hit is None:
        hit = prep[key] = make()
    return hit
