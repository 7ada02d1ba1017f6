"""Fine-tuning all-MiniLM-L6-v2's top transformer layers on labelled pairs (torch, offline).

Used by ``synapsectl cache tune-embedder``. Measured choices (figures in the bench and
in ``tune_embedder``'s report, not here):

- **Top layers only, on cached states.** The lower layers stay frozen, so every text goes
  through them once (:func:`lower_states`: in onnxruntime when it is installed, else
  torch) and training runs only the top ``layers`` on those cached states: a fraction of
  a full fine-tune's cost, and only the top layers' parameters ship.
- **Loss**: logistic loss on the scaled cosine of each labelled pair (the pair decision
  itself) plus in-batch multiple-negatives ranking on its positives (the other texts of
  the batch as negatives: what the vector search needs). AdamW, one pass by default.
- **Or an adapter** (``train_adapter``): a square matrix after pooling, trained on the
  frozen model's vectors with the same loss; alone (``--layers 0``) or above tuned layers.
- **Shipped as float16**: after training the weights are rounded to float16 in place
  (:func:`rounded_arrays`), so the vectors computed here for the verifier are those of
  the weights the agents load.
- Deterministic for a seed: data order, initial values and dropout come from seeded
  generators; on the same machine and thread count a rerun gives the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
STATE_BATCH = 64
ENCODE_CHUNK = 32       # texts padded together in training (see ``encode``)


@dataclasses.dataclass(frozen=True)
class States:
    """Every text's hidden states after the frozen lower layers (float16, no padding)."""

    flat: np.ndarray            # (tokens of all texts, dim)
    offsets: np.ndarray         # text i is flat[offsets[i]:offsets[i + 1]]

    def batch(self, ids: np.ndarray) -> tuple[Any, Any]:
        import torch

        lengths = self.offsets[ids + 1] - self.offsets[ids]
        h = np.zeros((len(ids), int(lengths.max()), self.flat.shape[1]), np.float32)
        mask = np.zeros(h.shape[:2], np.float32)
        for row, (i, n) in enumerate(zip(ids, lengths, strict=True)):
            h[row, :n] = self.flat[self.offsets[i]:self.offsets[i] + n]
            mask[row, :n] = 1.0
        return torch.from_numpy(h), torch.from_numpy(mask)


@dataclasses.dataclass(frozen=True)
class Labelled:
    """Pairs as indices into the texts of :class:`States`."""

    a: np.ndarray
    b: np.ndarray
    label: np.ndarray


def frozen_layers(model: Any) -> int:
    return len(model[0].auto_model.encoder.layer)


def lower_states(model: Any, texts: Sequence[str], lower: int,
                 step: Callable[[int], None]) -> States:
    """Run the first ``lower`` layers over every text once (``step(n)`` after n texts)."""
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    run = _onnx_lower(model, lower) or _torch_lower(model, lower)
    order = np.argsort([len(t) for t in texts], kind="stable")   # little padding per batch
    pieces: list[np.ndarray] = [np.zeros((0, 0), np.float16)] * len(texts)
    lengths = np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), STATE_BATCH):
        idx = order[start:start + STATE_BATCH]
        features = tokenize([texts[i] for i in idx])
        hidden = run({name: features[name].numpy() for name in INPUTS})
        mask = features["attention_mask"].numpy().astype(bool)
        for row, i in enumerate(idx):
            lengths[i] = int(mask[row].sum())
            pieces[i] = hidden[row, :lengths[i]].astype(np.float16)
        step(len(idx))
    offsets = np.zeros(len(texts) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    return States(np.concatenate(pieces), offsets)


def _lower_module(model: Any, lower: int) -> Any:
    import torch

    bert = model[0].auto_model

    class Lower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert        # a submodule: the exporter sees its weights as such

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hs = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            return run_layers(self.bert.encoder.layer[:lower], hs, attention_mask)

    return Lower().eval()


def run_layers(layers: Any, hidden: Any, mask: Any) -> Any:
    """BERT layers over ``hidden`` with padding ``mask`` (1 = token), as BertModel does."""
    import torch

    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _torch_lower(model: Any, lower: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    module = _lower_module(model, lower)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(module(*(torch.from_numpy(feeds[n]) for n in INPUTS)).numpy())
    return run


def _onnx_lower(model: Any, lower: int) -> Callable[[dict[str, np.ndarray]], np.ndarray] | None:
    """The lower layers exported to onnxruntime (several times faster on a CPU), or None."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        return None
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    sample = tokenize(["a sample", "a longer sample text for the export"])
    module = _lower_module(model, lower)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lower.onnx")
        axes = {n: {0: "batch", 1: "sequence"} for n in (*INPUTS, "hidden")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(sample[n] for n in INPUTS), path,
                              input_names=list(INPUTS), output_names=["hidden"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    # Below every layer (a full fine-tune) the graph never reads the mask: no such input.
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: np.asarray(session.run(
        ["hidden"], {n: v for n, v in feeds.items() if n in names})[0])


def top_layers(model: Any, lower: int) -> Any:
    """A trainable copy of the layers above ``lower``."""
    top = copy.deepcopy(model[0].auto_model.encoder.layer[lower:])
    for p in top.parameters():
        p.requires_grad_(True)
    return top


def encode(top: Any, states: States, ids: np.ndarray) -> Any:
    """Mean-pooled, normalised vectors of texts ``ids`` through ``top`` (a tensor, rows in
    the order of ``ids``). The texts go through in chunks of similar length: padded to
    the whole batch's longest text, one long question made a training step of every
    layer keep tens of GB of attention activations for its backward pass."""
    import torch

    order = np.argsort(states.offsets[ids + 1] - states.offsets[ids], kind="stable")
    chunks = [_encode_padded(top, states, ids[order[start:start + ENCODE_CHUNK]])
              for start in range(0, len(ids), ENCODE_CHUNK)]
    return torch.cat(chunks)[torch.from_numpy(np.argsort(order, kind="stable"))]


def _encode_padded(top: Any, states: States, ids: np.ndarray) -> Any:
    import torch

    hidden, mask = states.batch(ids)
    hidden = run_layers(top, hidden, mask)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1)


def embed_all(top: Any, states: States, batch: int = 256) -> np.ndarray:
    import torch

    n = len(states.offsets) - 1
    out = np.zeros((n, states.flat.shape[1]), np.float32)
    order = np.argsort(np.diff(states.offsets), kind="stable")
    top.eval()
    with torch.inference_mode():
        for start in range(0, n, batch):
            ids = order[start:start + batch]
            out[ids] = encode(top, states, ids).numpy()
    return out


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    epochs: int = 1
    batch: int = 96
    lr: float = 3e-5
    seed: int = 7


def steps(rows: int, options: TrainOptions) -> int:
    return options.epochs * -(-rows // options.batch)


def train(top: Any, states: States, pairs: Labelled, rows: np.ndarray,
          options: TrainOptions, step: Callable[[float], None]) -> Any:
    """Fit ``top`` on the pairs ``rows``; ``step(loss)`` after every batch."""
    import torch

    torch.manual_seed(options.seed)
    scale = torch.nn.Parameter(torch.tensor(20.0))
    bias = torch.nn.Parameter(torch.tensor(-16.0))
    opt = torch.optim.AdamW([{"params": list(top.parameters()), "lr": options.lr},
                             {"params": [scale, bias], "lr": 1e-2}], weight_decay=0.01)
    order = torch.Generator().manual_seed(options.seed)
    labels = torch.from_numpy(pairs.label.astype(np.float32))
    top.train()
    for _ in range(options.epochs):
        shuffled = rows[torch.randperm(len(rows), generator=order).numpy()]
        for start in range(0, len(shuffled), options.batch):
            b = shuffled[start:start + options.batch]
            loss = _loss(top, states, pairs, b, labels[b], scale, bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step(float(loss.detach()))
    top.eval()
    return top


def _loss(top: Any, states: States, pairs: Labelled, b: np.ndarray, y: Any, scale: Any,
          bias: Any) -> Any:
    return pair_loss(lambda ids: encode(top, states, ids), pairs, b, y, scale, bias)


def pair_loss(embed: Callable[[np.ndarray], Any], pairs: Labelled, b: np.ndarray, y: Any,
              scale: Any, bias: Any) -> Any:
    """The batch ``b``'s loss, ``embed(text ids)`` giving normalised vectors (a tensor)."""
    import torch
    from torch.nn import functional

    texts, where = np.unique(np.concatenate([pairs.a[b], pairs.b[b]]), return_inverse=True)
    vectors = embed(texts)
    u, v = vectors[where[:len(b)]], vectors[where[len(b):]]
    loss = functional.binary_cross_entropy_with_logits(scale * (u * v).sum(1) + bias, y)
    pos = y > 0
    if int(pos.sum()) > 1:
        target = torch.arange(int(pos.sum()))
        for q, own, other in ((u, v, u), (v, u, v)):
            candidates = torch.cat([own[pos], own[~pos], other[~pos]])
            loss = loss + functional.cross_entropy(20.0 * q[pos] @ candidates.T, target)
    return loss


def train_adapter(vectors: np.ndarray, pairs: Labelled, rows: np.ndarray,
                  options: TrainOptions, step: Callable[[float], None]) -> np.ndarray:
    """A square matrix ``W`` (from the identity) such that ``normalise(v @ W.T)`` separates
    the pairs ``rows`` better (same loss as the layers); ``vectors``: the texts' pooled,
    normalised vectors. Cheap: no transformer runs, so it can take many passes."""
    import torch

    torch.manual_seed(options.seed)
    base = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    weight = torch.nn.Parameter(torch.eye(base.shape[1]))
    scale = torch.nn.Parameter(torch.tensor(20.0))
    bias = torch.nn.Parameter(torch.tensor(-16.0))
    opt = torch.optim.AdamW([{"params": [weight], "lr": options.lr},
                             {"params": [scale, bias], "lr": 1e-2}], weight_decay=0.0)
    order = torch.Generator().manual_seed(options.seed)
    labels = torch.from_numpy(pairs.label.astype(np.float32))

    def embed(ids: np.ndarray) -> Any:
        return torch.nn.functional.normalize(base[torch.from_numpy(ids)] @ weight.T, dim=1)

    for _ in range(options.epochs):
        shuffled = rows[torch.randperm(len(rows), generator=order).numpy()]
        for start in range(0, len(shuffled), options.batch):
            b = shuffled[start:start + options.batch]
            loss = pair_loss(embed, pairs, b, labels[b], scale, bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step(float(loss.detach()))
    out: np.ndarray = weight.detach().numpy().astype(np.float32)
    return out


def rounded_arrays(top: Any, lower: int) -> dict[str, np.ndarray]:
    """The top layers' parameters as float16 arrays named as in BertModel's state_dict;
    the module's own weights are rounded to the same values."""
    import torch

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, tensor in top.state_dict().items():
            index, _, rest = name.partition(".")
            half = tensor.detach().to(torch.float16)
            tensor.copy_(half.to(tensor.dtype))
            out[f"encoder.layer.{lower + int(index)}.{rest}"] = half.numpy()
    return out
