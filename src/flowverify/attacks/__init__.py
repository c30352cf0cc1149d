"""Adversarial images under W1 perturbations: projected gradient descent in flow
space (Algorithm 1 of the paper, :mod:`.pgd`) and the search for the smallest
adversarial radius (:mod:`.minimal`).
"""

from flowverify.attacks.pgd import LOSSES, SCHEDULES, AttackResult, WassersteinPGD, attack

__all__ = ["AttackResult", "LOSSES", "SCHEDULES", "WassersteinPGD", "attack"]
