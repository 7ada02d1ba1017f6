"""The pair scorer's network: one definition for the agents that run it and the fitting
(``synapsectl cache tune-pair-scorer``) that trains it.

A cross-encoder over all-MiniLM-L6-v2: the two texts go through the transformer together
(``[CLS] a [SEP] b [SEP]``, truncated longest-first to ``max_len`` tokens), the last hidden
states are mean-pooled over the attention mask and one linear unit gives a logit. A pair
is scored in both orders and the two logits averaged, so the score does not depend on
which text was cached first. Unlike the embedder's cosine, the model sees both texts at
once, which is what tells "lose 5 kg" from "lose 15 kg" when the vectors are close.

:class:`FastNetwork` is the same computation rewritten for inference on small batches,
in bfloat16 on oneDNN for the agents' opt-in fast path
(:mod:`agent.embedding.pair_scorer_bf16`), or in float32 anywhere.

torch and transformers are imported when a model is built, never at import: the control
plane's serving path does not load this module at all (its verifier only knows the
scorer's id), and importing it costs nothing elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from synapse_common import minilm

F32 = npt.NDArray[np.float32]
MAX_LEN = 64            # tokens per pair: QQP pairs are about 30, 2.5 % reach this
SCORE_BATCH = 64         # pairs per pass (each in both orders)
# Characters of each text read per token of a pair: a text is cut to max_len times this
# before tokenizing. The pair's tokens come from its first words anyway, but the fast
# tokenizer builds every overflowing piece of both texts before truncating a pair, in time
# and memory growing with the square of their length: two 32,768-character texts took
# gigabytes (probe finding). Real text has far fewer characters per token.
CHARS_PER_TOKEN = 16


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


def onednn_bf16_missing() -> str | None:
    """Why this torch cannot run :class:`FastNetwork` in bfloat16 on oneDNN, or None
    (the CPU's own support is the caller's to check)."""
    import torch

    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this torch is built without oneDNN"
    ops = torch.ops.mkldnn
    if not all(hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")):
        return "this torch has no oneDNN prepacked linear"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and not amx():
        return "torch cannot use AMX on this CPU (or the kernel does not allow it)"
    return None


def intra_op_threads() -> int:
    """torch's intra-op thread count (``OMP_NUM_THREADS`` or the cores)."""
    import torch

    return int(torch.get_num_threads())


_Linear = Callable[..., Any]   # (x, act="none") -> x @ W.T + b, then act


class FastNetwork:
    """The cross-encoder's forward (ids, mask, token types → one float32 logit per row)
    from a built network's weights, its matrix products in ``dtype`` (default bfloat16),
    for inference only (in ``inference_mode``, from any thread): called as
    :func:`logits` calls the network.

    The same computation as the network's, written for small batches: query, key and
    value are one product, GELU (erf) is fused into the intermediate product, the BERT
    pooler (never read) is skipped. In bfloat16 only the products' inputs, weights and
    outputs are bfloat16 (each weight reordered once into oneDNN's blocked layout, not
    at every call); embeddings, layer norms, residual sums, attention, pooling and the
    head stay float32. In float32 it runs plain ``linear`` on any CPU.
    """

    def __init__(self, net: Any, dtype: Any = None) -> None:
        import torch

        self._dtype = torch.bfloat16 if dtype is None else dtype
        self._packed = self._dtype != torch.float32
        bert = net.bert
        cfg = bert.config
        kind = (getattr(cfg, "position_embedding_type", "absolute"), cfg.hidden_act)
        if kind != ("absolute", "gelu"):   # what this forward computes; anything else: no
            raise ValueError(f"FastNetwork computes absolute positions and GELU, not {kind}")
        self._heads = int(cfg.num_attention_heads)
        self._eps = float(cfg.layer_norm_eps)
        self._scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
        emb = bert.embeddings
        self._word = _f32(emb.word_embeddings.weight)
        self._position = _f32(emb.position_embeddings.weight)
        self._token_type = _f32(emb.token_type_embeddings.weight)
        self._norm = (_f32(emb.LayerNorm.weight), _f32(emb.LayerNorm.bias))
        self._layers = [self._layer(layer) for layer in bert.encoder.layer]
        self._head = (_f32(net.head.weight), _f32(net.head.bias))

    def _layer(self, layer: Any) -> dict[str, Any]:
        import torch

        attn = layer.attention
        parts = (attn.self.query, attn.self.key, attn.self.value)
        return {"qkv": self._linear(torch.cat([_f32(p.weight) for p in parts]),
                                    torch.cat([_f32(p.bias) for p in parts])),
                "out": self._linear(_f32(attn.output.dense.weight),
                                    _f32(attn.output.dense.bias)),
                "norm1": (_f32(attn.output.LayerNorm.weight), _f32(attn.output.LayerNorm.bias)),
                "up": self._linear(_f32(layer.intermediate.dense.weight),
                                   _f32(layer.intermediate.dense.bias)),
                "down": self._linear(_f32(layer.output.dense.weight),
                                     _f32(layer.output.dense.bias)),
                "norm2": (_f32(layer.output.LayerNorm.weight), _f32(layer.output.LayerNorm.bias))}

    def _linear(self, weight: Any, bias: Any) -> _Linear:
        """``x -> x @ weight.T + bias`` (then GELU when asked), in this network's dtype."""
        import torch
        from torch.nn import functional

        weight, bias = weight.to(self._dtype), bias.to(self._dtype)
        if not self._packed:
            def plain(x: Any, act: str = "none") -> Any:
                y = functional.linear(x, weight, bias)
                return functional.gelu(y) if act == "gelu" else y
            return plain
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

        def onednn(x: Any, act: str = "none") -> Any:
            # "gelu" with algorithm "none" is the exact (erf) GELU that BERT uses.
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, act, [],
                                                      "none" if act == "gelu" else "")
        return onednn

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        import torch

        with torch.inference_mode():    # thread-local: also when called from a pool
            return self._forward(input_ids, attention_mask, token_type_ids)

    @staticmethod
    def join(parts: Sequence[Any]) -> Any:
        """The logits of consecutive slices of rows, as one tensor."""
        import torch

        return torch.cat(list(parts))

    def _forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        import torch
        from torch.nn import functional

        rows, length = input_ids.shape
        x = (self._word[input_ids] + self._position[:length]
             + self._token_type[token_type_ids])
        x = self._normed(x, self._norm)
        blocked = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(
            torch.float32).min
        for layer in self._layers:
            qkv = layer["qkv"](x.to(self._dtype)).float()
            q, k, v = qkv.view(rows, length, 3, self._heads, -1).permute(2, 0, 3, 1, 4)
            weights = ((q @ k.transpose(-1, -2)) * self._scale + blocked).softmax(-1)
            context = (weights @ v).transpose(1, 2).reshape(rows, length, -1)
            x = self._normed(layer["out"](context.to(self._dtype)).float() + x, layer["norm1"])
            hidden = layer["up"](x.to(self._dtype), "gelu")
            x = self._normed(layer["down"](hidden).float() + x, layer["norm2"])
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return functional.linear(pooled, self._head[0], self._head[1]).squeeze(-1)

    def _normed(self, x: Any, norm: tuple[Any, Any]) -> Any:
        from torch.nn import functional

        return functional.layer_norm(x, (x.shape[-1],), norm[0], norm[1], self._eps)


def warm(network: Any, max_len: int) -> None:
    """Run ``network`` (a :class:`FastNetwork` in bfloat16) on two rows once at every
    length up to twice ``max_len``. oneDNN builds its bfloat16 kernels per shape of a
    product's input (rows times tokens) on first use, which makes that call markedly
    slower, so without this a lookup pays it the first time its shape is seen (float32's
    plain products have no such cost). This covers every call of up to two pairs (four
    rows) at any length."""
    import torch

    for length in range(2, 2 * max_len + 1):
        ids = torch.zeros((2, length), dtype=torch.long)
        network(ids, torch.ones_like(ids), torch.zeros_like(ids))


def _f32(tensor: Any) -> Any:
    return tensor.detach().float()   # float32 already: shares the network's memory


def tokenizer() -> Any:
    minilm.go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.model_path(), local_files_only=True)


def max_logit_difference(candidate: Any, net: Any, tok: Any, max_len: int,
                         pairs: Sequence[tuple[str, str]]) -> float:
    """The largest |``candidate`` logit - ``net`` logit| over ``pairs``, one at a time and
    batched: the start-up check of a faster runtime of the same network (ONNX, bfloat16)
    against the network itself."""
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    diff = 0.0
    for i in range(len(pairs)):
        got = logits(candidate, tok, a[i:i + 1], b[i:i + 1], max_len)
        want = logits(net, tok, a[i:i + 1], b[i:i + 1], max_len)
        diff = max(diff, float(np.abs(got - want).max()))
    got = logits(candidate, tok, a, b, max_len)
    want = logits(net, tok, a, b, max_len)
    return max(diff, float(np.abs(got - want).max()))


def logits(net: Any, tok: Any, texts_a: Sequence[str], texts_b: Sequence[str],
           max_len: int = MAX_LEN, batch: int = SCORE_BATCH) -> F32:
    """Each pair's logit, the average of its two orders (``net`` in eval mode); each text
    read up to ``max_len`` times :data:`CHARS_PER_TOKEN` characters."""
    import torch

    cut = max_len * CHARS_PER_TOKEN
    texts_a = [t[:cut] for t in texts_a]
    texts_b = [t[:cut] for t in texts_b]
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
