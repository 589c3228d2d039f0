"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

Later sources win: dataclass defaults, then the YAML file, then `key.path=value` overrides. Every user mistake
(unknown key, wrong type, impossible value) raises `ConfigError` with one line naming the key, the value and what is
allowed. This package knows nothing about torch, torch.distributed or accelerate.

Modules: checks (ConfigError, shared checks), generators (each generator's facts), model (model and loss
sections), sections (the others), schema (`Config`, cross-section checks), load (YAML, overrides, coercion);
`python -m trainer.config` is __main__.
"""
