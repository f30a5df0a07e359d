"""Speculative decoding: n-gram drafts (ngram.py), their verification (rejection.py), counters (stats.py)."""
