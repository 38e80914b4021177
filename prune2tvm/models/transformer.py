"""A BERT-style encoder stack (Devlin et al.) that takes token embeddings [B, S, H].

Written out with plain Linear layers (not nn.TransformerEncoderLayer, whose inference fast
path does not export to ONNX as separate projections), so every projection is a Linear that
pruning and the BSR rewrite see.
"""

from __future__ import annotations

from prune2tvm.models import MODELS


def bert_encoder(input_shape: tuple[int, ...], num_classes: int, layers: int = 12, heads: int = 12,
                 ffn: int | None = None):
    import math

    import torch
    from torch import nn

    seq, hidden = input_shape
    ffn = ffn or 4 * hidden
    head_dim = hidden // heads

    class EncoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.attention_output = nn.Linear(hidden, hidden)
            self.attention_norm = nn.LayerNorm(hidden)
            self.intermediate = nn.Linear(hidden, ffn)
            self.output = nn.Linear(ffn, hidden)
            self.output_norm = nn.LayerNorm(hidden)

        def forward(self, x):
            b = x.shape[0]

            def split(t):
                return t.reshape(b, seq, heads, head_dim).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim), dim=-1)
            context = (scores @ v).transpose(1, 2).reshape(b, seq, hidden)
            x = self.attention_norm(x + self.attention_output(context))
            return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[EncoderLayer() for _ in range(layers)])
            self.classifier = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.classifier(self.layers(x)[:, 0])

    return Encoder()


@MODELS.register("bert_base")
def bert_base(input_shape: tuple[int, ...], num_classes: int):
    """BERT-base dimensions: 12 layers, hidden 768, 12 heads, FFN 3072; input [B, S, 768]."""
    return bert_encoder(input_shape, num_classes)


@MODELS.register("bert_tiny")
def bert_tiny(input_shape: tuple[int, ...], num_classes: int):
    """2 layers, 2 heads, FFN 4x hidden: the same code at test size; input [B, S, H]."""
    return bert_encoder(input_shape, num_classes, layers=2, heads=2)
