"""What a policy-gradient update reports of its terms, and the window that `train.target_kl`
judges.

A term is one (sample, step) pair trained; a UNet call trains several. Every metric is a mean
over the update's trained steps (one entry a step, whatever the steps per call), but for
`grad_norm` (a mean over optimizer steps) and `is_weight_max` (the update's largest).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


class UpdateStats:
    def __init__(self, clip_range: float):
        self.clip_range = clip_range
        self.values: dict[str, list[float]] = defaultdict(list)
        self.by_staleness: dict[str, list[float]] = defaultdict(list)  # "<k>/clipfrac" -> values
        self.window = [0.0, 0.0]  # sum of 0.5 diff^2, and terms, since the last optimizer step

    @torch.no_grad()
    def add_call(
        self,
        steps: int,
        loss: torch.Tensor,
        info: dict[str, torch.Tensor],
        diff: torch.Tensor,
        staleness: torch.Tensor,
    ) -> None:
        """One training call of `steps` steps: its loss and the loss's info (means over the
        call's terms), and per term its log-prob minus the clip's centre and its staleness."""
        self.values["loss"] += [loss.item()] * steps
        for key, value in info.items():
            self.values[key] += [value.item()] * steps
        diff = diff.detach()
        self.window[0] += 0.5 * float((diff.double() ** 2).sum())
        self.window[1] += len(diff)
        clipped = (torch.exp(diff) - 1).abs() > self.clip_range
        for j, age in enumerate(staleness.tolist()):
            self.by_staleness[f"{age}/approx_kl"].append(0.5 * diff[j].item() ** 2)
            self.by_staleness[f"{age}/clipfrac"].append(float(clipped[j]))

    @property
    def optimizer_steps(self) -> int:
        return len(self.values["grad_norm"])

    def add_optimizer_step(self, grad_norm: float) -> None:
        """An optimizer step was taken: its gradient norm; the target_kl window starts anew."""
        self.values["grad_norm"].append(grad_norm)
        self.window = [0.0, 0.0]

    def metrics(self) -> dict[str, float]:
        out = {key: float(np.mean(v)) for key, v in self.values.items() if v}
        if self.values["is_weight_max"]:
            out["is_weight_max"] = float(np.max(self.values["is_weight_max"]))
        return out | {f"staleness/{k}": float(np.mean(v)) for k, v in self.by_staleness.items()}
