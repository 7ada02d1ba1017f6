"""The pair scorer's network: one definition for the agents that run it and the fitting
(``synapsectl cache tune-pair-scorer``) that trains it.

A cross-encoder over all-MiniLM-L6-v2: the two texts go through the transformer together
(``[CLS] a [SEP] b [SEP]``, truncated longest-first to ``max_len`` tokens), the last hidden
states are mean-pooled over the attention mask and one linear unit gives a logit. A pair
is scored in both orders and the two logits averaged, so the score does not depend on
which text was cached first. Unlike the embedder's cosine, the model sees both texts at
once, which is what tells "lose 5 kg" from "lose 15 kg" when the vectors are close.

torch and transformers are imported when a model is built, never at import: the control
plane's serving path does not load this module at all (its verifier only knows the
scorer's id), and importing it costs nothing elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from synapse_common import minilm

F32 = npt.NDArray[np.float32]
MAX_LEN = 64            # tokens per pair: QQP pairs are about 30, 2.5 % reach this
SCORE_BATCH = 64         # pairs per pass (each in both orders)


@functools.cache
def _network_class() -> Any:
    import torch

    class CrossEncoder(torch.nn.Module):
        """MiniLM over the pair, masked mean pool, dropout (training only), one logit."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert
            self.drop = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(bert.config.hidden_size, 1)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(self.drop(pooled)).squeeze(-1)

    return CrossEncoder


def build(layers: Mapping[str, npt.NDArray[Any]] | None = None,
          head_weight: npt.NDArray[Any] | None = None,
          head_bias: npt.NDArray[Any] | None = None, *, seed: int = 7) -> Any:
    """The network on the installed MiniLM weights, with ``layers`` (transformer
    parameters by their ``state_dict`` name) and the head put in when given; without a
    head, a fresh one from ``seed`` (the start of training)."""
    minilm.go_offline()     # before transformers (and huggingface_hub) are imported
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    bert = AutoModel.from_pretrained(minilm.model_path(), local_files_only=True)
    net = _network_class()(bert)
    if layers:
        state = bert.state_dict()
        unknown = sorted(set(layers) - set(state))
        if unknown:
            raise ValueError(f"the pair scorer names parameters MiniLM does not have: "
                             f"{', '.join(unknown[:3])}")
        for name, value in layers.items():
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"the pair scorer's {name} has shape {value.shape}, MiniLM's "
                                 f"is {tuple(state[name].shape)}")
            state[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
        bert.load_state_dict(state)
    if head_weight is not None and head_bias is not None:
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(np.asarray(head_weight, np.float32)
                                                   .reshape(net.head.weight.shape)))
            net.head.bias.copy_(torch.from_numpy(np.asarray(head_bias, np.float32)
                                                 .reshape(net.head.bias.shape)))
    return net


def tokenizer() -> Any:
    minilm.go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.model_path(), local_files_only=True)


def logits(net: Any, tok: Any, texts_a: Sequence[str], texts_b: Sequence[str],
           max_len: int = MAX_LEN, batch: int = SCORE_BATCH) -> F32:
    """Each pair's logit, the average of its two orders (``net`` in eval mode)."""
    import torch

    n = len(texts_a)
    out = np.zeros(n, dtype=np.float32)
    # Similar lengths batched together: padding is most of the cost otherwise.
    order = np.argsort([len(a) + len(b) for a, b in zip(texts_a, texts_b, strict=True)],
                       kind="stable")
    with torch.inference_mode():
        for start in range(0, n, batch):
            ks = order[start:start + batch]
            a, b = [texts_a[k] for k in ks], [texts_b[k] for k in ks]
            # Both orders in one pass (same lengths, so no extra padding): cheaper than two.
            enc = tok(a + b, b + a, truncation="longest_first", max_length=max_len,
                      padding=True, return_tensors="pt")
            got = net(enc["input_ids"], enc["attention_mask"],
                      enc["token_type_ids"]).float().numpy()
            out[ks] = (got[:len(ks)] + got[len(ks):]) / 2
    return out


def trained_arrays(net: Any, frozen: Sequence[str] = ()) -> tuple[
        dict[str, npt.NDArray[np.float32]], F32, F32]:
    """(transformer parameters except ``frozen``, head weight, head bias) as float32
    arrays: what a pair-scorer file keeps."""
    layers = {name: value.detach().cpu().numpy().astype(np.float32)
              for name, value in net.bert.state_dict().items() if name not in frozen}
    return (layers, net.head.weight.detach().cpu().numpy().astype(np.float32),
            net.head.bias.detach().cpu().numpy().astype(np.float32))
