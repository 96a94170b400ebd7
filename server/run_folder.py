"""The coordinator's run folder: config, metrics.json, best/final models, plots, report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from server.federation import FederationResult  # noqa: E402
from server.privacy_report import central_dp_markdown, privacy_markdown, privacy_summary  # noqa: E402
from shared.atomic_files import (  # noqa: E402
    atomic_file,
    write_json,  # noqa: E402
    write_text_atomic,
)
from shared.config import dump_config  # noqa: E402
from shared.fedio import build_global_model  # noqa: E402
from shared.model_card import build_card, write_card  # noqa: E402
from shared.model_file import save_model_file  # noqa: E402
from shared.pretrain_outputs import loss_curve_markdown, write_pretrain_outputs  # noqa: E402
from shared.report_tables import metrics_table, render_table  # noqa: E402


def _history(res: FederationResult) -> list[dict]:
    rows = []
    # every round: those the server evaluated (federation.evaluate_every) and those it ran
    for rnd in sorted(set(res.evaluator.history) | set(res.recorder.rounds)):
        rec = res.recorder.rounds.get(rnd)
        row = {"round": rnd, "server": res.evaluator.history.get(rnd)}
        if rec is not None:
            row.update({
                "clinics_sampled": rec.sampled,
                "clinics_replied": rec.replied,
                "clinics_failed": rec.train_failed,
                "clinics_no_reply": rec.no_reply,
                "skipped": rec.skipped,
                "attempts": rec.attempts,
                "clinics_rejected": {str(k): v for k, v in sorted(rec.rejected.items())},
                "clinics_declined": {str(k): v for k, v in sorted(rec.declined.items())},
                "clinics_errors": {str(k): v for k, v in sorted(rec.errors.items())},
                "clinics_train": {"aggregated": res.train_aggregated.get(rnd, {}),
                                  "per_clinic": {str(k): v for k, v in sorted(rec.train.items())}},
                "clinics_evaluate": {"aggregated": res.evaluate_aggregated.get(rnd, {}),
                                     "per_clinic": {str(k): v for k, v in
                                                    sorted(rec.evaluate.items())}},
                "bytes_sent": rec.bytes_sent,
                "bytes_received": rec.bytes_received,
                "round_seconds": rec.seconds,
                "clinic_evaluate_seconds": rec.evaluate_seconds,
            })
        row["central_eval_seconds"] = res.evaluator.seconds.get(rnd, 0.0)
        rows.append(row)
    return rows


def summary(res: FederationResult) -> dict:
    """metrics.json content: `final` as in `dentfed train`, plus the per-round history."""
    ev = res.evaluator
    last = max(ev.history)
    up = [r.bytes_received / len(r.train) for r in res.recorder.rounds.values() if r.train]
    return {
        "task": res.cfg.task.type,
        "headline": ev.key,
        "strategy": res.cfg.federation.strategy,
        "rounds": res.cfg.federation.rounds,
        "clinics": res.recorder.n_clinics,
        "final": ev.history[last],
        "best_round": ev.best_round,
        "best": ev.history.get(ev.best_round, {}),
        "history": _history(res),
        "seconds": res.seconds,
        "time_breakdown": {  # where the strategy's seconds went (simulate adds start-up)
            "clinic_train_phase": sum(r.seconds for r in res.recorder.rounds.values()),
            "clinic_evaluate_phase": sum(r.evaluate_seconds
                                         for r in res.recorder.rounds.values()),
            "central_evaluation": sum(res.evaluator.seconds.values()),
            # training, and the BatchNorm statistics pass a train reply may carry
            "clinic_train_compute": sum(c.get("train_seconds", 0.0)
                                        + c.get("bn_statistics_seconds", 0.0)
                                        for r in res.recorder.rounds.values()
                                        for c in r.train.values()),
        },
        "test_images": ev.n_test,
        "full_model_bytes": res.full_model_bytes,
        "upload_bytes_per_clinic_round": float(np.mean(up)) if up else 0.0,
        "upload_ratio": (float(np.mean(up)) / res.full_model_bytes) if up else 0.0,
        "upload_encoding": res.cfg.federation.upload,
        "download_encoding": res.cfg.federation.download,
        "stopped": res.stopped,
        **({"privacy": p} if (p := privacy_summary(res.cfg, res.recorder.rounds)) else {}),
        **({"central_dp": res.central_dp.summary()} if res.central_dp else {}),
        **({"cross_site": res.cross_site} if res.cross_site else {}),
    }


def _plot(res: FederationResult, path: Path) -> None:
    ev = res.evaluator
    rounds = sorted(ev.history)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(rounds, [ev.history[r].get(ev.key, np.nan) for r in rounds], "-o")
    axes[0].set(title=f"Central test {ev.key}", xlabel="round")
    axes[1].plot(rounds, [ev.history[r]["loss"] for r in rounds], "-o", label="central test")
    for idx in range(res.recorder.n_clinics):
        rs = [r for r in sorted(res.recorder.rounds) if idx in res.recorder.rounds[r].train]
        axes[1].plot(rs, [res.recorder.rounds[r].train[idx].get("train_loss", np.nan)
                          for r in rs], "--", alpha=0.7, label=f"clinic {idx} train")
        val = f"val_{ev.key}"  # not in a reply that only carried BatchNorm statistics
        es = [r for r in sorted(res.recorder.rounds)
              if val in res.recorder.rounds[r].evaluate.get(idx, {})]
        if es:
            axes[2].plot(es, [res.recorder.rounds[r].evaluate[idx][val] for r in es], "-o",
                         ms=3, label=f"clinic {idx}")
    axes[1].set(title="Loss", xlabel="round")
    axes[2].set(title=f"Clinic validation {ev.key}", xlabel="round")
    if not axes[2].get_lines():
        axes[2].text(0.5, 0.5, "no clinic-side evaluation\n(federation.fraction_evaluate 0)",
                     ha="center", va="center", transform=axes[2].transAxes)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _checkpoint(res: FederationResult, state: dict, path: Path) -> None:
    model = build_global_model(res.cfg)
    model.load_state_dict(state)
    save_model_file(path, model, res.cfg, thresholds=None)  # no clinic validation scores here


def pretrain_markdown(res: FederationResult, out: Path) -> str:
    """A pretraining federation: encoder.pt of the final global model, the reconstruction
    figure on the server's own test images, and the loss per round for report.md."""
    cfg = res.cfg
    model = build_global_model(cfg)
    model.load_state_dict(res.evaluator.final_state)
    write_pretrain_outputs(out, model, cfg, res.evaluator.manifest)
    rows = [(r, res.train_aggregated.get(r, {}).get("train_loss"),
             res.evaluator.history[r].get("loss")) for r in sorted(res.evaluator.history)]
    m = cfg.pretrain.federated_teacher_momentum
    teacher = ("" if cfg.pretrain.method != "mde" else
               "; the MDE teacher is re-derived from the global encoder at each clinic"
               if m is None else
               f"; the MDE teacher is the coordinator's moving average of the global encoders "
               f"(momentum {m:g} a round), sent with them from round 2 on")
    return (f"\n## Pretraining ({cfg.pretrain.method}, mask ratio {cfg.pretrain.mask_ratio:g})"
            "\n\nLoss on masked patches per round (train: the clinics' mean over their local "
            "steps; evaluation: the global model on the server's test images, round 0 = "
            "initial model):\n\n" + loss_curve_markdown(rows, "round")
            + "\nencoder for fine-tuning: encoder.pt (model.pretrained: this folder); "
            f"exchanged each round: encoder and decoder{teacher} (docs/pretraining.md)\n\n"
            "![reconstructions](reconstructions.png)\n")


def rounds_table(res: FederationResult) -> pd.DataFrame:
    rows = {}
    for row in _history(res):
        r = row["round"]
        used = row.get("clinics_replied", 0) - len(row.get("clinics_rejected", {}))
        rec = res.recorder.rounds.get(r)
        note = "" if rec is None else ("skipped: " + rec.skipped if rec.skipped else
                                       f"{rec.sampled - used} fewer clinic(s)"
                                       if used < rec.sampled else "")
        if rec is not None and rec.attempts > 1:
            note = f"{note}; {rec.attempts} attempts".lstrip("; ")
        central = row["server"] or {}  # {}: not evaluated (federation.evaluate_every)
        rows[r] = {f"central {res.evaluator.key}": central.get(res.evaluator.key),
                   "central loss": central.get("loss"),
                   "clinics used/sampled": f"{used}/{row['clinics_sampled']}"
                   if r and "clinics_sampled" in row else "-",  # SecAgg+: not recorded
                   "note": note,
                   "train loss (agg)": row.get("clinics_train", {}).get("aggregated", {})
                   .get("train_loss"),
                   "MB up (all clinics)": (row.get("bytes_received", 0) / 1e6) if r else None}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "round"
    return df.round(4)


def clinic_counts(res: FederationResult) -> dict:
    """Images per anonymous clinic index, as the clinics reported them (`num-examples`, the
    latest round each replied): the only data summary the coordinator has."""
    per: dict[str, dict[str, int]] = {}
    for rnd in sorted(res.recorder.rounds):
        rec = res.recorder.rounds[rnd]
        for kind, replies in (("train_images", rec.train), ("validation_images", rec.evaluate)):
            for idx, m in replies.items():
                if "num-examples" in m:
                    per.setdefault(str(idx), {})[kind] = int(m["num-examples"])
    return {"clinics": res.recorder.n_clinics, "per_clinic": dict(sorted(per.items())),
            "server_test_images": res.evaluator.n_test}


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def cross_site_markdown(cs: dict) -> str:
    """report.md: the models x clinics matrix with each model's mean and worst clinic, and
    the personalisation summary."""
    rows = {}
    for model in cs["models"]:
        name = ("global (final)" if model == "global"
                else f"clinic {model.rsplit('-', 1)[1]} personalised")
        s = cs["summary"][model]
        rows[name] = {**{f"clinic {c}": _cell(v) for c, v in cs["matrix"][model].items()},
                      "mean": _cell(s["mean"]),
                      "worst (clinic)": "-" if s["worst"] is None else
                      f"{s['worst']:.3f} ({s['worst_clinic']})"}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model"
    where = ("each clinic's personalised model was also sent to and scored at every other "
             "clinic (share_local_models)" if cs["share_local_models"] else
             "no model left a clinic: each personalised model is scored at its own clinic only "
             "(share_local_models off)")
    text = (f"## Cross-site evaluation ({cs['metric']} on each clinic's validation images)\n\n"
            "Scored at the clinics; only these scalars left them. '-': not scored there "
            f"(or undefined on that clinic's validation set).\n\n{render_table(df)}\n")
    p = cs.get("personalisation")
    if p:
        g, q = p["global"], p["personalised"]
        text += (f"\nPersonalisation ({p['steps']} local steps, scope {p['scope']}; {where}): "
                 f"mean over clinics {_cell(g['mean'])} global -> {_cell(q['mean'])} "
                 f"personalised, worst clinic {_cell(g['worst'])} -> {_cell(q['worst'])}; "
                 f"mean validation loss {_cell(p['mean_loss']['global'])} -> "
                 f"{_cell(p['mean_loss']['personalised'])}.\n")
    if cs["failed_replies"]:
        text += f"\n{cs['failed_replies']} clinic replies failed in this phase.\n"
    return text


def write_run_folder(res: FederationResult, out: Path) -> dict:
    """Write every file atomically into the run folder (which also holds the checkpoint and,
    from `dentfed simulate`, the split, so it is not replaced as a whole), metrics.json (the
    marker of a finished run) last."""
    out = Path(out)
    data = summary(res)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(res.cfg))
    _checkpoint(res, res.evaluator.final_state, out / "model_final.pt")
    _checkpoint(res, res.evaluator.best_state or res.evaluator.final_state,
                out / "model_best.pt")
    write_card(out, build_card(
        res.cfg, kind="federated", checkpoint="model_final.pt", thresholds=None,
        data=clinic_counts(res), metrics=data,
        evaluated_on=f"server test set ({data['test_images']} images), final round",
        extra={"best_checkpoint": {"file": "model_best.pt",
                                   "round": data["best_round"]}}))
    _plot(res, out / "rounds.png")
    table = metrics_table(res.cfg.task, data["final"])
    text = (f"# dentfed federated run\n\nstrategy {data['strategy']}, {data['rounds']} rounds,"
            f" {data['clinics']} clinics, {data['seconds']:.0f} s\n\n"
            f"## Per round\n\n{render_table(rounds_table(res))}\n\n"
            f"## Final global model on the server test set ({data['test_images']} images)\n\n"
            f"{render_table(table)}\n\nbest round: {data['best_round']}\n\n![rounds]"
            "(rounds.png)\n")
    if "privacy" in data:
        text += "\n" + privacy_markdown(data["privacy"], data["clinics"])
    if "central_dp" in data:
        text += "\n" + central_dp_markdown(data["central_dp"])
    if "cross_site" in data:
        text += "\n" + cross_site_markdown(data["cross_site"])
    if res.cfg.task.type == "pretrain":
        text += pretrain_markdown(res, out)
    if res.stopped:
        text = text.replace("\n\n", f"\n\n**Stopped early:** {res.stopped}\n\n", 1)
    write_text_atomic(out / "report.md", text)
    write_json(out / "metrics.json", data)
    return data
