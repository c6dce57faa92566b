"""The grounding head every method shares: a [REG] token reasons over text and visual tokens and regresses one box.

TransVG (Deng et al., 2021, Sec. 3.3) introduced it; HiVG and MaPPER reuse it. The [REG] token is prepended to the
projected text and visual tokens, a transformer encoder mixes them (position embeddings added to queries and keys in
every layer, as in DETR), and the [REG] output goes through a 3-layer MLP and a sigmoid to a normalised (cx, cy, w, h).
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderLayer(nn.Module):
    """One DETR-style encoder layer: self-attention with positions on queries/keys, then an FFN.

    `normalize_before=False` is the post-norm layer of TransVG/MaPPER; HiVG runs it pre-norm.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _attend(self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        q = k = x + pos
        return self.dropout(self.self_attn(q, k, x, key_padding_mask=padding_mask, need_weights=False)[0])

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.normalize_before:
            x = x + self._attend(self.norm1(x), pos, padding_mask)
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self._attend(x, pos, padding_mask))
        return self.norm2(x + self._ffn(x))


class BoxMLP(nn.Module):
    """A 3-layer MLP from the [REG] feature to a box: Linear-ReLU-Linear-ReLU-Linear."""

    def __init__(self, dim: int, out_dim: int = 4, layers: int = 3):
        super().__init__()
        dims = [dim] * layers + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class GroundingHead(nn.Module):
    """[REG] + transformer encoder + 3-layer MLP + sigmoid -> boxes_cxcywh normalised to [0, 1].

    Input: `tokens` (B, N, dim), the method's text and visual tokens already projected to `dim` and concatenated in
    the method's order (TransVG: text then visual), with `padding_mask` (B, N), True where a token is padding.
    `num_tokens` is N, fixed by the method (learned position embeddings need it): e.g. TransVG-R50 20 + 400.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.reg_token = nn.Embedding(1, dim)
        self.pos_embed = nn.Embedding(num_tokens + 1, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout, normalize_before) for _ in range(depth))
        # Pre-norm stacks end with a LayerNorm (their residual stream is never normalised otherwise).
        self.final_norm = nn.LayerNorm(dim) if normalize_before else nn.Identity()
        self.box_mlp = BoxMLP(dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier on every matrix, as DETR/TransVG initialise their transformers.
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name and "reg_token" not in name:
                nn.init.xavier_uniform_(p)

    def encode(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every output token of the encoder over [REG] + tokens, after the final norm: (B, 1 + N, dim).

        `padding_mask` (B, N): bool, True where a token is padding (masked out of attention); or float, added to the
        attention logits as it is (MaPPER's release passes its 0/1 padding mask as a float: +1 on padded keys).
        """
        b, n, _ = tokens.shape
        if n != self.num_tokens:
            raise ValueError(f"GroundingHead was built for {self.num_tokens} tokens, got {n}")
        x = torch.cat([self.reg_token.weight.expand(b, 1, -1), tokens], dim=1)  # (B, 1 + N, D)
        pos = self.pos_embed.weight.unsqueeze(0)  # (1, 1 + N, D)
        if padding_mask is not None:
            padding_mask = padding_mask.to(x.dtype) if padding_mask.is_floating_point() else padding_mask.bool()
            padding_mask = torch.cat([padding_mask.new_zeros(b, 1), padding_mask], dim=1)  # [REG] never padded
        for layer in self.layers:
            x = layer(x, pos, padding_mask)
        return self.final_norm(x)

    def forward(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (boxes_cxcywh (B, 4) in [0, 1], reg_feature (B, dim)); `padding_mask` as in `encode`."""
        reg = self.encode(tokens, padding_mask)[:, 0]  # (B, D)
        return self.box_mlp(reg).sigmoid(), reg
