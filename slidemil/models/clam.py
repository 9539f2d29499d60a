"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021).

Both variants project each tile (Linear, ReLU, Dropout) and score it with gated attention
(``tanh(V h) * sigmoid(U h)``, each with dropout, then a linear layer):

- ``clam_sb`` (single branch): one attention map; the attention-pooled vector goes through one linear
  classifier of C outputs.
- ``clam_mb`` (multi-branch): one attention branch per class; class c's logit is its own linear score
  of the bag pooled by branch c. Its ``attention_per_class`` output is the C maps, and ``attention`` is
  the map of the predicted class (what CLAM's heatmaps draw).

**Instance-level clustering** (the auxiliary loss, training only): one binary instance classifier
per class. For a bag of class y, classifier y learns that the ``k`` tiles with the highest attention
(of branch y for ``clam_mb``) are positive evidence and the ``k`` tiles with the lowest attention are
negative; with more than two classes (mutually exclusive subtypes, CLAM's ``subtyping``) the
classifier of every other class c also learns that the ``k`` tiles branch c attends to most are not of
class c. The term is the mean cross-entropy (averaged over classes when subtyping), added to the bag
loss with weight ``loss.instance_weight`` (default 0.3 / 0.7, CLAM's ``bag_weight`` 0.7 as a ratio to
the bag loss) and ``k`` = ``loss.instance_k`` (default 8, CLAM's ``k_sample``), capped at half of a
bag's real tiles. Padded tiles are never selected. The instance classifiers do not take part in
inference: ``head.onnx`` holds the attention and bag classifier only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.mil import (
    HeadConfig,
    MILHead,
    MILOutput,
    masked_scores,
    predicted_class_map,
    projection,
    register_head,
)


class GatedAttention(nn.Module):
    """CLAM's gated attention network: (B, N, H) -> (B, N, K) scores, K branches."""

    def __init__(self, hidden_dim: int, attention_dim: int, branches: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class CLAM(MILHead):
    """CLAM-SB (``multi_branch=False``) or CLAM-MB (``multi_branch=True``).

    Args:
        in_dim: feature width D.
        n_classes: number of classes C.
        hidden_dim: projection width (CLAM "small": 512).
        attention_dim: attention width (CLAM "small": 256).
        dropout: dropout after the projection and in the attention network.
        multi_branch: one attention branch and one bag classifier per class.
    """

    default_instance_weight = 0.3 / 0.7
    default_instance_k = 8

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, multi_branch: bool = False) -> None:
        super().__init__(in_dim, n_classes)
        self.multi_branch = self.per_class_attention = multi_branch
        self.projection = projection(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, n_classes if multi_branch else 1, dropout)
        if multi_branch:  # one linear score per class, of the bag pooled by that class's branch
            self.bag_weight = nn.Parameter(torch.empty(n_classes, hidden_dim))
            self.bag_bias = nn.Parameter(torch.zeros(n_classes))
            nn.init.kaiming_uniform_(self.bag_weight, a=5 ** 0.5)  # as nn.Linear(hidden_dim, 1), once per class
        else:
            self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes))
        self.subtyping = n_classes > 2

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """features (B, N, D) [+ mask (B, N)] -> MILOutput (with ``attention_per_class`` for CLAM-MB)."""
        self._check_inputs(features, mask)
        h = self.projection(features)  # (B, N, H)
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        raw, weights = masked_scores(self.attention(h).transpose(1, 2), mask)  # (B, K, N)
        pooled = torch.bmm(weights, h)  # (B, K, H)
        if self.multi_branch:
            logits = (pooled * self.bag_weight).sum(-1) + self.bag_bias
        else:
            logits = self.classifier(pooled[:, 0])
        logits = logits / self.temperature
        self._keep(h=h, raw=raw)
        if not self.multi_branch:
            return MILOutput(logits, weights[:, 0], raw[:, 0])
        return MILOutput(logits, predicted_class_map(weights, logits), predicted_class_map(raw, logits), weights)

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The instance clustering loss of the last training forward (see the module docstring)."""
        kept = self._take()
        h, raw = kept["h"], kept["raw"]  # (B, N, H), (B, K, N) with -inf on padding
        k = k or self.default_instance_k
        # every instance classifier takes part in the graph (DDP needs a gradient for each parameter)
        total = torch.stack([0.0 * p.sum() for p in self.instance_classifiers.parameters()]).sum()
        for b in range(len(labels)):
            real = torch.isfinite(raw[b, 0])
            n = int(real.sum())
            kb = max(1, min(k, n // 2))
            y, terms = int(labels[b]), []
            for c, classifier in enumerate(self.instance_classifiers):
                scores = raw[b, c if self.multi_branch else 0]
                if c == y:  # in the class: most attended tiles positive, least attended negative
                    top = scores.topk(kb).indices
                    picks, targets = [top], [torch.ones(kb, dtype=torch.long)]
                    if n >= 2:
                        bottom = scores.masked_fill(~real, float("inf")).topk(kb, largest=False).indices
                        picks.append(bottom)
                        targets.append(torch.zeros(kb, dtype=torch.long))
                    idx, target = torch.cat(picks), torch.cat(targets).to(h.device)
                elif self.subtyping:  # another subtype: what branch c attends to most is not of class c
                    idx = scores.topk(kb).indices
                    target = torch.zeros(kb, dtype=torch.long, device=h.device)
                else:
                    continue
                terms.append(F.cross_entropy(classifier(h[b, idx]), target))
            loss_b = torch.stack(terms).sum() / (self.n_classes if self.subtyping else 1)
            weight = 1.0 if class_weights is None else class_weights[y].to(loss_b)
            total = total + weight * loss_b
        norm = float(len(labels)) if class_weights is None else class_weights.to(h)[labels].sum()
        return total / norm


def _clam_args(cfg: HeadConfig) -> dict[str, object]:
    return {"in_dim": cfg.in_dim, "n_classes": cfg.n_classes, "hidden_dim": cfg.hidden_dim,
            "attention_dim": cfg.attention_dim, "dropout": cfg.dropout}


@register_head("clam_sb")
def clam_sb(cfg: HeadConfig) -> CLAM:
    """CLAM single branch: one attention map, instance clustering per class."""
    return CLAM(**_clam_args(cfg), multi_branch=False)  # type: ignore[arg-type]


@register_head("clam_mb")
def clam_mb(cfg: HeadConfig) -> CLAM:
    """CLAM multi-branch: one attention branch (and map) per class."""
    return CLAM(**_clam_args(cfg), multi_branch=True)  # type: ignore[arg-type]
