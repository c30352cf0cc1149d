"""Adversarial examples: the paper's section 4 and Fig. 2 (claim ``fig2``).

Fig. 2 shows a digit with an adversarial example of our Wasserstein PGD attack and one
of Wong et al.'s projected-Sinkhorn attack (ART ``Wasserstein``).  Reproduced with the
``fc`` model: the table ``digits`` (exact W1, prediction and success of both attacks per
digit) and the figure ``fig2.png`` (original, ours and Wong et al.'s, with the exact W1
under each image).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowverify.paper.attack_comparison import WONG, _our_attack, _w1_rows, _wong_attack
from flowverify.paper.common import ClaimResult, _Env, _figure, _predict, _save_fig

#: The paper's statement of the claim.
PAPER = "Fig. 2: an adversarial digit of our attack and one of Wong et al.'s"


def _claim_fig2(env: _Env, cfg: dict[str, Any]) -> ClaimResult:
    """Adversarial examples of both attacks (section 4, Fig. 2)."""
    from flowverify.model.loading import load_model

    res = ClaimResult("fig2", "Adversarial examples [4, Fig. 2]", PAPER, dict(cfg))
    res.settings["wong"] = dict(WONG, max_iter=cfg["wong_iters"])
    model = load_model(cfg["model"])
    x, y, idx = env.eval_digits(cfg["candidates"])
    ok = _predict(model, x) == y
    x, y, idx = x[ok], y[ok], idx[ok]
    ours = _our_attack(model, x, y, cfg, env.seed, eps=None, clip_max=1.0)
    wong = _wong_attack(model, x, y, iters=cfg["wong_iters"], stop_after=cfg["n"])
    if wong is None:
        res.notes.append("ART is not installed: Wong et al.'s attack is not shown.")
        show = np.arange(min(cfg["n"], len(x)))
    else:
        res.notes += wong["err"]
        good = np.flatnonzero(wong["success"])
        rest = [i for i in range(len(x)) if i not in set(good.tolist())]
        show = np.array(([*good.tolist(), *rest])[: cfg["n"]], dtype=int)
        if len(good) < len(show):
            res.notes.append(
                f"Wong et al.'s attack failed within {cfg['wong_iters']} iterations on "
                f"{len(show) - len(good)} of the digits shown (image left unchanged)."
            )
    w_ours = np.asarray(ours.w1)
    w_wong = None if wong is None else _w1_rows(x, wong["adversarial"], wong["success"])
    for k in show:
        rec = {
            "index": int(idx[k]),
            "label": int(y[k]),
            "ours_w1": float(w_ours[k]),
            "ours_prediction": int(ours.prediction_adversarial[k]),
            "ours_success": bool(ours.success[k]),
        }
        if wong is not None:
            rec.update(
                wong_w1=float(w_wong[k]),
                wong_success=bool(wong["success"][k]),
                wong_prediction=int(_predict(model, wong["adversarial"][k : k + 1])[0]),
                wong_seconds=float(wong["seconds"][k]),
            )
        res.per_image.append(rec)
    res.tables["digits"] = res.per_image
    res.notes.append(
        "Both attacks keep pixels in [0, 1] (ours: clip_max=1, Wong et al.: clipping), the "
        "threat model of Wong et al.; W1 is the exact normalised W1 (w1_distance) between "
        "the digit and the returned image."
    )
    Figure = _figure()
    if Figure is not None:
        cols = 3 if wong is not None else 2
        fig = Figure(figsize=(1.9 * cols, 2.1 * len(show)))
        axes = fig.subplots(len(show), cols, squeeze=False)
        for r, k in enumerate(show):
            panels = [(x[k], f"digit #{idx[k]} (label {y[k]})", None)]
            panels.append(
                (
                    ours.adversarial[k],
                    f"ours → {ours.prediction_adversarial[k]}",
                    w_ours[k] if ours.success[k] else None,
                )
            )
            if wong is not None:
                wp = res.per_image[r]["wong_prediction"]
                panels.append(
                    (
                        wong["adversarial"][k],
                        f"Wong et al. → {wp}" if wong["success"][k] else "Wong et al.: failed",
                        w_wong[k] if wong["success"][k] else None,
                    )
                )
            for ax, (img, title, w) in zip(axes[r], panels, strict=True):
                ax.imshow(img[0], cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title, fontsize=7)
                if w is not None:
                    ax.set_xlabel(f"W1 = {w:.4f}", fontsize=8)
                elif title.startswith("digit"):
                    ax.set_xlabel("original", fontsize=8)
        fig.suptitle("fc model; exact W1, normalised", fontsize=8)
        _save_fig(fig, env.out / "fig2" / "fig2.png", res)
    return res
