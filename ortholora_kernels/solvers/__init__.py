"""The solve stage of every aggregator (filled in below)."""
