"""Glue between attnseg and training frameworks; each submodule imports its framework itself.

* :mod:`attnseg.integrations.mmengine`: ``ConvertAttentionHook`` for mmengine / mmsegmentation
  configs (needs ``pip install mmengine``).

``import attnseg`` and ``import attnseg.integrations`` never import a framework.
"""
