"""The control plane's settings sections, one module per concern.

The root, :class:`controlplane.config.ControlPlaneSettings`, composes them and re-exports
every section; callers keep writing ``from controlplane import config``.
"""
