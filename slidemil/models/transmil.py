"""TransMIL: transformer-based correlated MIL (Shao et al., NeurIPS 2021), with Nyström attention
(Xiong et al., AAAI 2021).

The bag's tiles are projected (Linear, ReLU, Dropout) to tokens, a learned class token is put in
front, and two transformer layers (pre-norm, multi-head Nyström self-attention, residual) run over the
sequence with a PPEG (pyramid position encoding generator) between them; the class token, layer-
normalised, goes through a linear classifier.

- **Nyström attention** approximates ``softmax(Q K^T) V`` by ``softmax(Q K~^T) pinv(softmax(Q~ K~^T))
  softmax(Q~ K^T) V`` with ``landmarks`` landmark queries/keys ``Q~, K~`` (segment means of the
  sequence: L tokens fall into ``landmarks`` consecutive segments of equal size, give or take one;
  a sequence shorter than that repeats tokens), the pseudo-inverse by ``pinv_iterations`` Newton
  iterations, and a depthwise convolution (kernel 33) along the sequence on V added as a residual.
  Memory and time are linear in the number of tiles (no N x N matrix is ever formed), so a bag of
  50,000 tiles runs in a few GB.
- **PPEG**: the tokens, in bag order (row-major over the tile grid, as the coords files list them),
  are laid on a square of side ``ceil(sqrt(N))`` that is filled by repeating the first tokens, as in
  the paper; depthwise convolutions of 7, 5 and 3 pixels (plus identity) over that square encode
  position. Unlike the paper, the fill only serves the convolutions: the sequence that the second
  layer sees holds each tile once, so no tile counts twice in the attention.
- **Attention map**: TransMIL pools by attention of the class token, so a tile's attention is the
  class token's row of the second layer's Nyström attention matrix, averaged over the heads
  (computed as a row, linear in N). Nyström rows sum to 1 but may hold small negative values:
  ``attention`` is that row clipped at 0 and renormalised over the tiles, ``attention_raw`` its log,
  so that ``softmax(attention_raw) == attention`` as for the other heads.
- **Padding**: the bags of a padded batch (``mask``) run one by one on their real tiles, so the
  square fill and the attention never see a padded tile and a padded batch gives exactly what each
  bag gives alone.

There is no auxiliary loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.mil import HeadConfig, MILHead, MILOutput, projection, register_head

RESIDUAL_KERNEL = 33  # the depthwise convolution along the sequence on V (Xiong et al.)
ATTENTION_FLOOR = 1e-12  # added to the clipped class-token row before the log


def segment_means_matrix(length: torch.Tensor, n_positions: int, landmarks: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """(landmarks, L) averaging matrix: row i is 1 / count over the tokens of segment i, 0 elsewhere.

    Segment i covers tokens ``[floor(i L / m), max(floor((i + 1) L / m), floor(i L / m) + 1))``: equal
    segments (give or take one token) when L >= m, single tokens (some repeated) when L < m. Built
    from tensors only, so an exported graph takes any L.
    """
    i = torch.arange(landmarks, device=device)
    start = torch.div(i * length, landmarks, rounding_mode="floor")
    end = torch.maximum(torch.div((i + 1) * length, landmarks, rounding_mode="floor"), start + 1)
    j = torch.arange(n_positions, device=device)
    member = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(dtype)
    return member / member.sum(dim=-1, keepdim=True)


def iterative_pinv(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix of ``x`` by Newton iterations (Razavi et al.),
    each matrix scaled by its own norms (so bags never influence each other)."""
    a = x.abs()
    scale = a.sum(dim=-1).amax(dim=-1) * a.sum(dim=-2).amax(dim=-1)  # (...,)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention: (B, L, dim) -> (B, L, dim) and the first token's attention row (B, L)."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (RESIDUAL_KERNEL, 1), padding=(RESIDUAL_KERNEL // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))  # (B, h, L, d) each
        q = q * self.scale
        positions = torch.ones_like(x[0, :, 0], dtype=torch.long).cumsum(0)  # 1..L, from the data's shape
        length = positions[-1:]
        segments = segment_means_matrix(length, x.shape[1], self.landmarks, x.dtype, x.device)  # (m, L)
        q_landmarks, k_landmarks = segments @ q, segments @ k  # (B, h, m, d)
        attn1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)  # (B, h, L, m)
        attn2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)  # (B, h, m, m)
        attn3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)  # (B, h, m, L)
        z = iterative_pinv(attn2, self.pinv_iterations)
        out = attn1 @ (z @ (attn3 @ v)) + self.residual(v)  # (B, h, L, d)
        first_row = ((attn1[:, :, :1] @ z) @ attn3).squeeze(2).mean(dim=1)  # (B, L)
        return self.to_out(out.transpose(1, 2).flatten(2)), first_row


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads, landmarks, pinv_iterations)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, row = self.attention(self.norm(x))
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7x7, 5x5 and 3x3 convolutions over the tokens laid
    row-major on a square of side ceil(sqrt(N)) (filled by repeating the first tokens); the class token
    passes unchanged. The three kernels act on the same grid, so they run as one 7x7 kernel, as gathers
    over the N tokens (no square tensor, whose size would depend on N non-linearly in an exported graph).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]
        kernel = (self.proj7.weight[:, 0] + F.pad(self.proj5.weight[:, 0], (1, 1, 1, 1))
                  + F.pad(self.proj3.weight[:, 0], (2, 2, 2, 2)))  # (C, 7, 7)
        bias = self.proj7.bias + self.proj5.bias + self.proj3.bias  # type: ignore[operator]
        t = torch.ones_like(tokens[0, :, 0], dtype=torch.long).cumsum(0) - 1  # 0..N-1
        n = t[-1:] + 1
        side = torch.ceil(torch.sqrt(n.to(torch.float64))).to(torch.long)
        row = torch.div(t, side, rounding_mode="floor")
        col = t - row * side
        dx = torch.arange(-3, 4, device=t.device)[:, None]  # (7, 1): one kernel row at a time
        c = col[None, :] + dx  # (7, N)
        c_ok = (c >= 0) & (c < side)
        out = tokens + bias
        for dy in range(-3, 4):
            r = row + dy
            ok = c_ok & ((r >= 0) & (r < side))[None, :]  # (7, N) inside the square
            source = torch.where(ok, torch.remainder(r[None, :] * side + c, n), torch.zeros_like(c))  # fill: u - N
            gathered = tokens.index_select(1, source.flatten()).unflatten(1, (7, -1))  # (B, 7, N, C)
            weight = ok.to(tokens.dtype)[..., None] * kernel[:, dy + 3].transpose(0, 1)[:, None, :]  # (7, N, C)
            out = out + (gathered * weight).sum(dim=1)
        return torch.cat([cls, out], dim=1)


class TransMIL(MILHead):
    """TransMIL head (see the module docstring).

    Args:
        in_dim: feature width D.
        n_classes: number of classes C.
        hidden_dim: token width (the paper: 512).
        dropout: dropout after the projection.
        n_heads: attention heads.
        landmarks: Nyström landmarks (the paper: hidden_dim / 2, the default at hidden_dim 256).
        pinv_iterations: pseudo-inverse iterations.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25, n_heads: int = 8,
                 landmarks: int = 128, pinv_iterations: int = 6) -> None:
        super().__init__(in_dim, n_classes)
        self.projection = projection(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = TransLayer(hidden_dim, n_heads, landmarks, pinv_iterations)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, n_heads, landmarks, pinv_iterations)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """features (B, N, D) [+ mask (B, N)] -> MILOutput; padded bags run one by one on their real tiles."""
        self._check_inputs(features, mask)
        if mask is None or bool(mask.all()):
            return self._bags(features)
        outs = [self._bags(features[b:b + 1, mask[b]]) for b in range(len(features))]
        logits = torch.cat([o.logits for o in outs])
        attention = features.new_zeros(mask.shape)
        raw = features.new_full(mask.shape, float("-inf"))
        for b, o in enumerate(outs):
            attention[b, mask[b]] = o.attention[0]
            raw[b, mask[b]] = o.attention_raw[0]
        return MILOutput(logits, attention, raw)

    def _bags(self, features: torch.Tensor) -> MILOutput:
        h = self.projection(features)  # (B, N, H)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1).to(h.dtype), h], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h)
        h, row = self.layer2(h)
        logits = self.classifier(self.norm(h)[:, 0]) / self.temperature
        weights = row[:, 1:].clamp(min=0.0) + ATTENTION_FLOOR
        return MILOutput(logits, weights / weights.sum(dim=-1, keepdim=True), torch.log(weights))


@register_head("transmil")
def transmil(cfg: HeadConfig) -> TransMIL:
    """TransMIL: two Nyström transformer layers with a PPEG between them."""
    return TransMIL(cfg.in_dim, cfg.n_classes, cfg.hidden_dim, cfg.dropout, cfg.n_heads, cfg.landmarks,
                    cfg.pinv_iterations)
