"""Runtime code every Synapse process shares: settings, logs, command bootstrap, clock,
ports, the stand-in tokenizer and the MiniLM loader. The bottom layer above ``protos``:
it imports nothing of ``agent``, ``controlplane``, ``simulator`` or ``synapse_cli``."""
