"""The paper's claims reproduced end to end, each with its setting and the
figure it reports (:mod:`.claims`).
"""

from flowverify.paper.claims import (
    CLAIMS,
    SETTINGS,
    ClaimResult,
    find_data,
    reproduce,
    run_claim,
)

__all__ = ["CLAIMS", "ClaimResult", "SETTINGS", "find_data", "reproduce", "run_claim"]
