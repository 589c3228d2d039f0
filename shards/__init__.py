"""Offline dataset tools: image folders or synthetic tasks -> tar shards + manifest.json. Never imports trainer."""
