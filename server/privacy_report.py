"""The coordinator's view of the clinics' DP-SGD privacy loss: each clinic reports its own
epsilon (accounted over every round it trained in) in its train metrics; a clinic whose budget
is spent declines with a structured reply (shared.dp_sgd.declined_reply). This module reads
both into the run report."""

from __future__ import annotations

from shared.config import Config


def privacy_summary(cfg: Config, rounds: dict) -> dict | None:
    """metrics.json `privacy`: each clinic's epsilon per round it trained in, the rounds it
    declined, its last epsilon (the one it reported training or declining) and the maximum
    over clinics. None without DP-SGD."""
    dp = cfg.privacy.dp_sgd
    if dp is None:
        return None
    per_round: dict[str, dict[str, float]] = {}
    declined: dict[str, dict[str, str]] = {}
    last: dict[str, float] = {}
    for rnd in sorted(rounds):
        rec = rounds[rnd]
        eps = {str(idx): float(m["epsilon"]) for idx, m in sorted(rec.train.items())
               if "epsilon" in m}
        if eps:
            per_round[str(rnd)] = eps
            last.update(eps)
        if rec.declined:
            declined[str(rnd)] = {str(k): v for k, v in sorted(rec.declined.items())}
        # a declining clinic's own figure: after a resume its ledger can hold a round the
        # checkpoint lost (released to the crashed coordinator, then re-run)
        last.update({str(k): max(v, last.get(str(k), 0.0))
                     for k, v in rec.declined_epsilon.items()})
    return {
        "mechanism": "DP-SGD (Opacus, RDP accountant, Poisson sampling), per clinic",
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "noise_multiplier": dp.noise_multiplier,
        "target_epsilon": dp.target_epsilon,
        "max_epsilon": dp.max_epsilon,
        "epsilon_per_round": per_round,
        "declined": declined,
        "epsilon_per_clinic": dict(sorted(last.items(), key=lambda kv: int(kv[0]))),
        "epsilon_max": max(last.values()) if last else 0.0,
    }


def privacy_markdown(summary: dict | None, n_clinics: int) -> str:
    """report.md section: a round x clinic epsilon table ('declined' where a clinic refused)."""
    if not summary:
        return ""
    rounds = sorted({int(r) for r in summary["epsilon_per_round"]}
                    | {int(r) for r in summary["declined"]})
    head = "| round | " + " | ".join(f"clinic {i}" for i in range(n_clinics)) + " |"
    lines = [head, "|---:|" + "---:|" * n_clinics]
    for r in rounds:
        eps = summary["epsilon_per_round"].get(str(r), {})
        dec = summary["declined"].get(str(r), {})
        cells = [f"{eps[str(i)]:.3f}" if str(i) in eps else
                 ("declined" if str(i) in dec else "-") for i in range(n_clinics)]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    budget = (f", max_epsilon {summary['max_epsilon']:g}" if summary["max_epsilon"] else "")
    return ("## Privacy (DP-SGD per clinic)\n\n"
            f"Epsilon at delta {summary['delta']:g} spent by each clinic's training images, "
            f"composed over every round it trained in (max_grad_norm "
            f"{summary['max_grad_norm']:g}{budget}).\n\n" + "\n".join(lines) +
            f"\n\nmaximum epsilon over clinics: **{summary['epsilon_max']:.3f}**\n")


def central_dp_markdown(summary: dict) -> str:
    """report.md section for client-level (central) DP."""
    if not summary["accounted"]:
        eps = "not accounted (adaptive clipping; Flower has no accountant for it)"
    else:
        rows = " | ".join(f"{r}: {e:.3f}" for r, e in summary["epsilon_per_round"].items())
        eps = f"**{summary['epsilon']:.3f}** at delta {summary['delta']:g} (per round: {rows})"
    return ("## Privacy (client-level, central DP)\n\n"
            f"{summary['mechanism']}; {summary['clinics_per_round']} clinics per round, "
            f"noise multiplier {summary['noise_multiplier']:g}, clipping norm "
            f"{summary['clipping_norm']:g}. Epsilon for any one clinic's whole data: {eps}\n")
