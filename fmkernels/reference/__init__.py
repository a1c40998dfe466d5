"""Readable fp32 PyTorch implementations: the oracle every backend is tested against, and the last-resort
fallback. One function per op, written for clarity, not speed."""
