"""DSMIL: dual-stream multiple-instance learning (Li, Li and Eliceiri, CVPR 2021).

After the instance projection (Linear, ReLU, Dropout) two streams score a bag:

- the **instance stream** (max pooling): a linear instance classifier gives every tile C logits; per
  class, the tile with the highest logit is that class's *critical instance*;
- the **bag stream**: every tile gets a query ``q = tanh(W2 relu(W1 h))`` and a value
  ``v = relu(Wv dropout(h))``; per class, a tile's attention score is the inner product of its query
  with the critical instance's query, scaled by ``1 / sqrt(attention_dim)``, and the softmax of the
  scores over the bag pools the values into one vector per class. The C pooled vectors together go
  through one linear layer (the paper's 1-D convolution over the classes) to the bag logits.

So the head has one attention map per class (``attention_per_class``, C x N: where each class's
critical instance points); ``attention`` is the predicted class's map. The **auxiliary loss** is the
instance stream's: cross-entropy of each class's top instance logit (the mean of the ``k`` highest,
``loss.instance_k``, default 1) against the bag label, weighted like the bag loss (the paper sums the
two streams' losses with equal weights: ``loss.instance_weight`` default 1). The bag logits are the
bag stream's, as in the paper's evaluation. Padded tiles never become critical and get zero attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slidemil.models.mil import (
    HeadConfig,
    MILHead,
    MILOutput,
    masked_scores,
    max_instance_loss,
    predicted_class_map,
    projection,
    register_head,
)


class DSMIL(MILHead):
    """Dual-stream MIL head.

    Args:
        in_dim: feature width D.
        n_classes: number of classes C.
        hidden_dim: projection (and value) width.
        attention_dim: query width (the paper: 128).
        dropout: dropout after the projection and before the value layer.
    """

    per_class_attention = True
    default_instance_weight = 1.0
    default_instance_k = 1

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.projection = projection(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.ReLU(),
                                   nn.Linear(attention_dim, attention_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Linear(n_classes * hidden_dim, n_classes)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """features (B, N, D) [+ mask (B, N)] -> MILOutput with ``attention_per_class`` (B, C, N)."""
        self._check_inputs(features, mask)
        h = self.projection(features)  # (B, N, H)
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        instance_logits = self.instance_classifier(h)  # (B, N, C)
        ranked = instance_logits if mask is None else instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        critical = ranked.argmax(dim=1)  # (B, C): the critical instance of each class
        h_critical = h.gather(1, critical.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, C, H)
        q = self.query(h)  # (B, N, A)
        q_critical = self.query(h_critical)  # (B, C, A)
        scores = torch.bmm(q_critical, q.transpose(1, 2)) * self.scale  # (B, C, N)
        raw, weights = masked_scores(scores, mask)
        pooled = torch.bmm(weights, self.value(h))  # (B, C, H)
        logits = self.bag_classifier(pooled.flatten(1)) / self.temperature
        self._keep(instance_logits=instance_logits, mask=mask if mask is not None else
                   torch.ones(features.shape[:2], dtype=torch.bool, device=features.device))
        return MILOutput(logits, predicted_class_map(weights, logits), predicted_class_map(raw, logits), weights)

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The instance stream's max-pooling loss of the last training forward."""
        kept = self._take()
        return max_instance_loss((kept["instance_logits"] / self.temperature).float(), kept["mask"], labels,
                                 k or self.default_instance_k, class_weights)


@register_head("dsmil")
def dsmil(cfg: HeadConfig) -> DSMIL:
    """DSMIL: max-instance critical tile per class, attention relative to it."""
    return DSMIL(cfg.in_dim, cfg.n_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
