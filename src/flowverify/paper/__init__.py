"""The paper's claims reproduced end to end, each with its setting and the
figure it reports: one module per claim (:mod:`.reference_finetuning` for Fig. 1,
:mod:`.adversarial_examples` for Fig. 2, :mod:`.attack_comparison` for the attack size
and time of section 4, :mod:`.linear_certificates` for Appendix A and Fig. 4,
:mod:`.smoothing_comparison` for section 3.3), shared data and results in
:mod:`.common`, and the drivers in :mod:`.run`.
"""

from flowverify.paper.common import ClaimResult, find_data
from flowverify.paper.run import CLAIMS, SETTINGS, reproduce, run_claim

__all__ = ["CLAIMS", "ClaimResult", "SETTINGS", "find_data", "reproduce", "run_claim"]
