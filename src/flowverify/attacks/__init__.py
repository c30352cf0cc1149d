"""Adversarial images under W1 perturbations: projected gradient descent in flow space
(Algorithm 1 of the paper, :mod:`.pgd`) and the search for the smallest adversarial radius
(:mod:`.minimal`).
"""

from flowverify.attacks.descent import SCHEDULES
from flowverify.attacks.losses import LOSSES
from flowverify.attacks.pgd import WassersteinPGD, attack
from flowverify.attacks.result import AttackResult

__all__ = ["AttackResult", "LOSSES", "SCHEDULES", "WassersteinPGD", "attack"]
