"""When a known model is good enough to stand for the models it simulates.

A fingerprint's p0 is read off its references and its p1 off its simulated pirates; a reference
that never learnt the task (a degenerate model predicting one class agrees 0.0 with the owner on
every core point) makes p0 look small and turns every competent independent model into a
"pirate". So every model the builder trains is measured on natural held-out data and refused
below a floor; the floors are stored with the fingerprint and checked again before a test.

Floors, with the reasons:
- A model of the owner's architecture trained on the owner's kind of data (independent
  references, distilled and extracted students, fine-tuned and pruned copies) must come within
  `OWNER_ARCH_GAP` (10 points) of the owner's held-out accuracy: the independent models it stands
  for are competitors that ship models about as good as the owner's (a competitor 10 points
  worse has no product), and an architecture that reached the owner's accuracy once reaches it
  again with an ordinary recipe.
- Other architectures (and an adversarially fine-tuned copy, which trades accuracy for
  robustness by design, and any reference the user supplies) must keep `OTHER_ARCH_SHARE` (40 %)
  of the owner's skill above chance: a small MLP cannot match a CNN, but a model with less than
  that has not learnt the task and does not behave like a trained classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OWNER_ARCH_GAP = 0.10
OTHER_ARCH_SHARE = 0.4
# Families whose models keep the owner's architecture and aim at its accuracy.
_CLOSE_FAMILIES = ("fine-tune", "prune", "distill", "extract", "same-arch")


@dataclass(frozen=True)
class Quality:
    """A known model measured on natural held-out data."""

    accuracy: float  # share of held-out samples it labels correctly
    agreement: float  # share of held-out samples it labels as the owner does
    samples: int


def accuracy_floor(family: str, arch: str, owner_accuracy: float, num_classes: int) -> float:
    """The least held-out accuracy a known model of `family`/`arch` must reach (see module doc)."""
    if arch == "owner" and family in _CLOSE_FAMILIES:
        return owner_accuracy - OWNER_ARCH_GAP
    chance = 1.0 / num_classes
    return chance + OTHER_ARCH_SHARE * max(0.0, owner_accuracy - chance)


def quality_problem(name: str, family: str, arch: str, accuracy: float | None, owner_accuracy: float | None,
                    num_classes: int) -> str | None:
    """Why a known model cannot be trusted, in a phrase, or None when it passes (or when the
    owner's accuracy is unknown, in which case nothing can be judged)."""
    if accuracy is None or owner_accuracy is None or math.isnan(owner_accuracy):
        return None
    floor = accuracy_floor(family, arch, owner_accuracy, num_classes)
    if accuracy >= floor:
        return None
    what = "the owner's architecture" if arch == "owner" and family in _CLOSE_FAMILIES else f"architecture {arch}"
    return (f"{name} ({family}, {what}) has held-out accuracy {accuracy:.3f} against the owner's "
            f"{owner_accuracy:.3f}, below its floor {floor:.3f}")
