"""An ensemble head: K heads of one configuration, trained side by side, that predict as one.

A MIL head trained on a few dozen slides can find a lesion of a few tiles in one run and miss it in
the next: the run that misses learns its training slides by slide-wide differences instead (stain,
texture), and only a different initialisation tells the two apart. The trainer trains K of them
side by side (``--inits K``) and by default keeps the one with the lowest validation loss
(:mod:`slidemil.trainer.inits`); averaging them (``--init-choice average``, this head as exported) helps
less, as a memorising member is as confident as one that found the lesion (README, "Several
initialisations"). The members share nothing but their input; in training the trainer sums the members' own losses (bag loss of
:attr:`MILOutput.member_logits` and auxiliary term) and clips each member's gradient on its own
(:meth:`EnsembleHead.independent_parameters`), so a member learns exactly as it would alone: with
dropout off, member 0 ends bit for bit where a single head of the same seed does.

The ensemble predicts the normalised geometric mean of the members' probabilities: its logits are
the mean of the members' log-probabilities (divided by the ensemble's own calibration temperature).
A member that has become over-confident on a slide (probabilities of 1e-6 are common after 40
epochs on small cohorts) then weighs as much as one confident member should, where an arithmetic
mean of probabilities lets it outvote the others. Its attention is the mean of the members'
attention (each sums to 1 over the tiles, so the mean does too), and per-class heads average their
per-class maps. Exported as one ``head.onnx`` with the outputs of a single head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from slidemil.models.mil import MILHead, MILOutput, predicted_class_map


class EnsembleHead(MILHead):
    """K heads with the same input, one prediction (see the module docstring).

    Args:
        members: the heads (same ``in_dim``, ``n_classes`` and kind), each initialised on its own.
    """

    def __init__(self, members: Sequence[MILHead]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        if any((m.in_dim, m.n_classes, type(m)) != (first.in_dim, first.n_classes, type(first)) for m in members):
            raise ValueError("ensemble members must be heads of one kind with the same in_dim and n_classes")
        super().__init__(first.in_dim, first.n_classes)
        self.members = nn.ModuleList(members)
        self.per_class_attention = first.per_class_attention
        self.default_instance_weight = first.default_instance_weight
        self.default_instance_k = first.default_instance_k

    def heads(self) -> list[MILHead]:
        """The members (none yet while ``MILHead.__init__`` runs)."""
        members = self._modules.get("members")
        return [] if members is None else [cast(MILHead, m) for m in cast(nn.ModuleList, members)]

    @property
    def keep_for_loss(self) -> bool:
        """Whether the members keep what their auxiliary terms need (set on all of them at once)."""
        return bool(self.heads()) and all(m.keep_for_loss for m in self.heads())

    @keep_for_loss.setter
    def keep_for_loss(self, value: bool) -> None:
        for m in self.heads():  # MILHead.__init__ sets it before the members exist
            m.keep_for_loss = value

    @property
    def input_layers(self) -> tuple[str, ...]:
        """The Linear layers that take the raw features: one per member."""
        return tuple(f"members.{i}.{layer}" for i, m in enumerate(self.heads()) for layer in m.input_layers)

    def independent_parameters(self) -> list[list[nn.Parameter]]:
        """One list per member: the trainer clips each member's gradient norm on its own."""
        return [list(m.parameters()) for m in self.heads()]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Score bags with every member and combine (see the module docstring).

        Returns:
            MILOutput with the ensemble's logits, attention, ``log(attention)`` as ``attention_raw``, the
            mean per-class maps for per-class heads, and ``member_logits`` (K, B, C).
        """
        self._check_inputs(features, mask)
        outs = [m(features, mask) for m in self.heads()]
        member_logits = torch.stack([o.logits for o in outs])  # (K, B, C)
        logits = torch.log_softmax(member_logits, dim=-1).mean(dim=0) / self.temperature
        per_class = None
        if self.per_class_attention:
            per_class = torch.stack([cast(torch.Tensor, o.attention_per_class) for o in outs]).mean(dim=0)
            attention = predicted_class_map(per_class, logits)
        else:
            attention = torch.stack([o.attention for o in outs]).mean(dim=0)
        return MILOutput(logits, attention, torch.log(attention), per_class, member_logits)

    def auxiliary_loss(self, labels: torch.Tensor, k: int | None = None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sum of the members' auxiliary terms, as the trainer sums their bag losses (None when the
        members have none)."""
        terms = [m.auxiliary_loss(labels, k, class_weights) for m in self.heads()]
        kept = [t for t in terms if t is not None]
        return torch.stack(kept).sum() if kept else None
