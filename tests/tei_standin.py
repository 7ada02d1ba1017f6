"""TEI's command line in front of the engine simulator's TEI mode, so that an agent can
supervise a "TEI" (``engine: tei``) on a machine without TEI: it takes the flags the
agent passes to ``text-embeddings-router`` (``--model-id``, ``--hostname``, ``--port``,
then the backend's ``extra_args``) and runs ``synapse simulator --engine tei`` with them.

Run as the agent's ``supervisor.tei_command``: ``[python, tests/tei_standin.py]``;
``extra_args: [--task, rerank]`` makes it a reranker. TEI's key variable, ``API_KEY``
(the engine key an agent passes), becomes the simulator's ``SYNAPSE_API_KEY``.
"""

from __future__ import annotations

import os
import pathlib
import sys


def main(argv: list[str]) -> None:
    translated: list[str] = []
    names = {"--model-id": "--model", "--hostname": "--host"}
    for arg in argv:
        translated.append(names.get(arg, arg))
    synapse = pathlib.Path(sys.executable).parent / "synapse"
    if key := os.environ.pop("API_KEY", None):
        os.environ["SYNAPSE_API_KEY"] = key
    os.execv(str(synapse), [str(synapse), "simulator", "--engine", "tei", *translated])


if __name__ == "__main__":
    main(sys.argv[1:])
