"""The engine tier installer (`make engines`); see install.py. Run with the main venv's
python from the repository root; it imports only the standard library and synapse_common."""
