"""The ``synapse`` and ``synapsectl`` commands: the top layer, the only package that
imports the process packages (``agent``, ``controlplane``, ``simulator``)."""
