"""Offline tier: runs OneRec-Think (vLLM or HF) over users and stores reasoning + item prefixes in Redis."""
