"""`dentfed` command line. User mistakes print one `error:` line per problem and exit 1;
no traceback unless DENTFED_DEBUG=1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from shared.errors import DentfedError  # noqa: E402

log = logging.getLogger("dentfed")


def _cmd_data_check(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from shared.data.manifest import read_manifest, summarize
    from shared.report_tables import render_table

    cfg = load_config(args.config)
    if cfg.task.type == "detection":
        return _data_check_detection(args, cfg)
    m = read_manifest(args.manifest, cfg.task, default_modality=cfg.data.modality,
                      check_images=not args.skip_images)
    overview, counts = summarize(m)
    print(render_table(overview))
    print()
    print(render_table(counts))
    print(f"\nok: {len(m)} images" + ("" if args.skip_images else ", all decoded"))
    return 0


def _data_check_detection(args: argparse.Namespace, cfg) -> int:
    import pandas as pd

    from shared.data.detection import class_counts, read_detection_manifest
    from shared.report_tables import render_table

    df = read_detection_manifest(args.manifest, cfg.task.labels,
                                 check_images=not args.skip_images)
    n_boxes = df["boxes"].map(len)
    overview = {"images": len(df), "patients": df["patient_id"].nunique(),
                "sites": df["site"].nunique(), "boxes": int(n_boxes.sum()),
                "images without boxes": int((n_boxes == 0).sum())}
    if "split" in df:
        for s in ("train", "val", "test"):
            overview[f"{s} images"] = int((df["split"] == s).sum())
    print(render_table(pd.DataFrame({"value": overview})))
    print()
    print(render_table(class_counts(df, cfg.task.labels)))
    print(f"\nok: {len(df)} images, {int(n_boxes.sum())} boxes" +
          ("" if args.skip_images else ", all decoded, every box inside its image"))
    return 0


def _cmd_data_import_detection(args: argparse.Namespace) -> int:
    from dental_datasets import detection_import as di

    common = {"patient_regex": args.patient_regex, "site": args.site,
              "site_from": args.site_from, "modality": args.modality}
    if args.data_command == "import-yolo":
        df = di.import_yolo(args.root, args.out, **common)
    else:
        df = di.import_coco(args.coco_json, args.out, images_root=args.images_root, **common)
    names = df.attrs["class_names"]
    sites = f", {df['site'].nunique()} sites" if "site" in df else ""
    print(f"wrote {args.out}: {len(df)} images, {int(df['boxes'].map(len).sum())} boxes, "
          f"{df['patient_id'].nunique()} patients{sites}"
          + ("" if args.patient_regex else " (no --patient-regex: each image is its own "
             "patient)"))
    print(f"task.labels ({len(names)}): [{', '.join(names)}]")
    return 0


def _cmd_data_export_detection(args: argparse.Namespace) -> int:
    from dental_datasets import detection_import as di

    names = None
    if args.config:
        from shared.config import load_config

        names = load_config(args.config).task.labels
    if args.data_command == "export-yolo":
        out = di.export_yolo(args.manifest, args.out, names)
    else:
        out = di.export_coco(args.manifest, args.out, names)
    print(f"wrote {out}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from dental_datasets import synth

    t0 = time.perf_counter()
    size = args.image_size or (256 if args.task == "implant-detection" else 128)
    path = synth.GENERATORS[args.task](Path(args.out), n=args.n, seed=args.seed,
                                       image_size=size)
    print(f"wrote {args.n} synthetic {args.task} images and {path} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_data_import(args: argparse.Namespace) -> int:
    from dental_datasets.folder_import import import_folder

    df = import_folder(args.root, args.out, args.patient_regex, args.label_column, args.site,
                       args.modality)
    extra = f", {df['patient_id'].nunique()} patients" if "patient_id" in df else \
        " (no --patient-regex: every image will count as its own patient)"
    print(f"wrote {args.out}: {len(df)} images, {df[args.label_column].nunique()} classes{extra}")
    return 0


def _cmd_data_deidentify(args: argparse.Namespace) -> int:
    from dentfed.dicom_deidentify import deidentify_tree

    written = deidentify_tree(args.input, args.output)
    print(f"wrote {len(written)} de-identified DICOM file(s) to {args.output} (PS3.15 Basic "
          "Application Level Confidentiality Profile; pixels are not inspected)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from shared.report_tables import render_table
    from simulations.pooled_training import run_training

    cfg = load_config(args.config)
    if args.epochs:
        from shared.config import with_overrides

        cfg = with_overrides(cfg, {"train.epochs": args.epochs})
    cfg = _apply_overrides(cfg, args)  # --tracking-uri
    out = Path(args.out or f"runs/train-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    res = run_training(cfg, args.manifest, out, cv=args.cv, seed=args.seed)
    title = f"{args.cv}-fold patient-grouped CV (mean ± sd)" if args.cv else "test split"
    print(f"\n{title}, {res['seconds']:.0f} s of training\n")
    print(render_table(res["table"]))
    print(f"\n{res['headline']}: {res['final'][res['headline']]:.4f}")
    if "privacy" in res:
        print(f"DP-SGD epsilon {res['privacy']['epsilon']} at delta {res['privacy']['delta']:g}")
    print(f"run folder: {out}")
    return 0


def _apply_overrides(cfg, args: argparse.Namespace):
    """The config with the command-line values that override the YAML, validated again by the
    whole schema (cross-field rules included) before anything is split or started."""
    from shared.config import with_overrides

    overrides = {}
    for attr, section, key in (("clinics", "split", "clinics"), ("scheme", "split", "scheme"),
                               ("alpha", "split", "alpha"), ("by", "split", "by"),
                               ("test_fraction", "split", "test_fraction"),
                               ("split_seed", "split", "seed"),
                               ("strategy", "federation", "strategy"),
                               ("rounds", "federation", "rounds"),
                               ("local_epochs", "federation", "local_epochs"),
                               ("ray_address", "simulation", "ray_address"),
                               ("tracking_uri", "tracking", "uri")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[f"{section}.{key}"] = value
    return with_overrides(cfg, overrides) if overrides else cfg


def _cmd_data_split(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from simulations.simulate import prepare_split

    cfg = load_config(args.config)
    cfg = _apply_overrides(cfg, args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty")
    prepare_split(cfg, args.manifest, out)  # logs the summary table
    print(f"wrote {cfg.split.clinics} clinic manifests, server_test.csv and "
          f"label_distribution.png to {out}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from simulations.simulate import simulate

    if not args.compare and (args.strategies is not None or args.seeds is not None):
        raise DentfedError("--strategies and --seeds only apply with --compare")
    if args.compare and args.strategy is not None:
        raise DentfedError("--strategy runs one federation; with --compare use --strategies")
    if args.resume:
        if args.config or args.compare or args.out:
            raise DentfedError("--resume RUN_DIR continues that run with its own config.yaml; "
                               "leave out --config, --out and --compare")
        out = Path(args.resume)
        data = simulate(None, None, out, echo=args.verbose, resume=True)
    else:
        if not args.config:
            raise DentfedError("--config is required (or --resume RUN_DIR)")
        cfg = load_config(args.config)
        cfg = _apply_overrides(cfg, args)
        if args.compare:
            if cfg.task.type == "pretrain":
                raise DentfedError("--compare compares classifiers; a pretrain task is compared "
                                   "downstream (simulations/bench_pretrain.py)")
            return _simulate_compare(cfg, args)
        out = Path(args.out or
                   f"runs/sim-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        data = simulate(cfg, args.manifest, out, echo=args.verbose)
    print((out / "report.md").read_text())
    print(f"{data['headline']} over rounds: " + " -> ".join(
        f"{row['server'].get(data['headline'], float('nan')):.3f}" for row in data["history"]
        if row["server"] is not None))  # None: not evaluated (federation.evaluate_every)
    print(f"wall time {data['wall_seconds']:.0f} s; run folder: {out}")
    if data.get("stopped"):
        print(f"error: the run stopped early: {data['stopped']}", file=sys.stderr)
        return 1
    return 0


def _simulate_compare(cfg, args: argparse.Namespace) -> int:
    """`dentfed simulate --compare`: pooled, local-only and federated models on one split."""
    import shlex

    from simulations.compare import (
        DEFAULT_STRATEGIES,
        parse_seeds,
        parse_strategies,
        run_compare,
        table_markdown,
    )

    strategies = parse_strategies(args.strategies or ",".join(DEFAULT_STRATEGIES))
    seeds = parse_seeds(args.seeds or "0")
    out = Path(args.out or f"runs/compare-{Path(args.config).stem}-"
               f"{time.strftime('%Y%m%d-%H%M%S')}")
    res = run_compare(cfg, args.manifest, out, strategies, seeds,
                      command="dentfed " + shlex.join(args.argv), echo=args.verbose)
    cells = "mean ± sd over seeds " + ",".join(map(str, seeds)) if len(seeds) > 1 else \
        f"seed {seeds[0]}"
    print(f"\n{res['metric']} on each clinic's test set and the pooled test set ({cells})\n")
    print(table_markdown(res["table"]))
    print(f"\nwall time {res['seconds']:.0f} s; compare.md, compare.csv, compare.json in {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from dentfed.predict import model_card_text, run_predict

    if args.card:
        from dentfed.inference import load_model

        print(model_card_text(load_model(args.model)))
        if args.input is None:
            return 0
    if args.input is None or args.out is None:
        raise DentfedError("predict needs IMAGE|FOLDER|MANIFEST and --out (or only --card)")
    expect = None
    if args.config:
        from shared.config import load_config

        expect = load_config(args.config).task
    res = run_predict(args.model, args.input, args.out, batch_size=args.batch_size,
                      workers=args.workers, precision=args.precision,
                      saliency=args.saliency, saliency_limit=args.saliency_limit,
                      expect_task=expect, min_score=args.min_score,
                      numbering=not args.raw_numbers, fhir=args.fhir,
                      patient_reference=args.fhir_patient)
    ok = res["images"] - res["failed"]
    print(f"predicted {ok} of {res['images']} images in {res['seconds']:.1f} s "
          f"({res['precision']}); predictions.csv and predictions.json in {args.out}")
    if res.get("sheet"):
        print(f"saliency sheet: {res['sheet']}")
    if res["failed"]:
        print(f"error: {res['failed']} of {res['images']} images could not be read; they are "
              "listed with status 'unreadable' and the reason in predictions.csv",
              file=sys.stderr)
        return 2 if ok else 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dentfed.predict import run_export

    for kind, path in run_export(args.model, args.calibrate).items():
        print(f"{kind}: {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from dentfed.serve import serve

    serve(args.model, host=args.host, port=args.port, max_mb=args.max_mb,
          keep_uploads=Path(args.keep_uploads) if args.keep_uploads else None)
    return 0


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clinics", type=int)
    p.add_argument("--scheme", choices=["site", "iid", "dirichlet", "quantity", "pathological"])
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--by", help="stratification column for label skew (e.g. category)")
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--split-seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dentfed", description="Federated training for dental "
                                "images: data tools, pooled training and federation.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="manifests and demo data").add_subparsers(
        dest="data_command", required=True)
    c = data.add_parser("check", help="validate a manifest and print a summary")
    c.add_argument("manifest")
    c.add_argument("--config", required=True, help="YAML config declaring the task's labels")
    c.add_argument("--skip-images", action="store_true", help="don't decode every image")
    c.set_defaults(func=_cmd_data_check)

    s = data.add_parser("synth", help="write a synthetic demo dataset with a manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--task", choices=["anomalies", "implants", "implant-detection"],
                   required=True, help="anomalies: multi-label photos; implants: one implant "
                   "per radiograph, its system; implant-detection: 1-4 boxed implants per "
                   "radiograph, labelled by system")
    s.add_argument("--n", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, help="default 128 (256 for implant-detection)")
    s.set_defaults(func=_cmd_data_synth)

    i = data.add_parser("import-folder", help="ImageFolder tree (one folder per class) -> "
                        "manifest; train/val/test top folders fill a split column")
    i.add_argument("root")
    i.add_argument("--out", required=True, help="manifest CSV to write")
    i.add_argument("--patient-regex", help="regex on the file name; group 1 is the patient id")
    i.add_argument("--label-column", default="label")
    i.add_argument("--site")
    i.add_argument("--modality", choices=["photo", "radiograph"])
    i.set_defaults(func=_cmd_data_import)

    for kind, what in (("import-yolo", "a YOLO folder (images/, labels/*.txt, data.yaml)"),
                       ("import-coco", "a COCO detection JSON")):
        i = data.add_parser(kind, help=f"{what} -> detection manifest (path, patient_id, site, "
                            "boxes); nothing is written unless every box is valid")
        if kind == "import-yolo":
            i.add_argument("root")
        else:
            i.add_argument("coco_json")
            i.add_argument("--images-root", help="folder the file_names are relative to "
                           "(default: the JSON's folder)")
        i.add_argument("--out", required=True, help="manifest CSV to write")
        i.add_argument("--patient-regex", help="regex on the file name; group 1 is the "
                       "patient id (default: each image is its own patient)")
        i.add_argument("--site", help="one site (clinic) for every image")
        i.add_argument("--site-from", metavar="REGEX", help="regex on the file name; group 1 "
                       "is the site, e.g. '^(cate\\d+)-' for UFBA-425's category")
        i.add_argument("--modality", choices=["photo", "radiograph"], default="radiograph")
        i.set_defaults(func=_cmd_data_import_detection)
    for kind, what in (("export-yolo", "a YOLO folder (new)"), ("export-coco", "a COCO JSON")):
        e = data.add_parser(kind, help=f"detection manifest -> {what}")
        e.add_argument("manifest")
        e.add_argument("--out", required=True)
        e.add_argument("--config", help="class order from this config's task.labels "
                       "(default: sorted box labels)")
        e.set_defaults(func=_cmd_data_export_detection)

    sp = data.add_parser("split", help="split a manifest into virtual clinics (by patient)")
    sp.add_argument("manifest")
    sp.add_argument("--config", required=True)
    sp.add_argument("--out", required=True)
    _split_args(sp)
    sp.set_defaults(func=_cmd_data_split)

    de = data.add_parser("deidentify", help="strip patient identifiers from DICOM files (PS3.15 "
                         "Basic Profile) to share a test set")
    de.add_argument("input", help="a DICOM file or a folder (searched recursively)")
    de.add_argument("output", help="new folder, written all-or-nothing")
    de.set_defaults(func=_cmd_data_deidentify)

    sim = sub.add_parser("simulate", help="federated simulation: N virtual clinics on Flower's "
                         "simulation runtime, central evaluation every round")
    sim.add_argument("--config")
    sim.add_argument("--manifest", help="overrides data.manifest")
    sim.add_argument("--out", help="run folder (default runs/sim-<config>-<time>)")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted simulation "
                     "after its last checkpointed round")
    sim.add_argument("--strategy")
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--local-epochs", type=int)
    sim.add_argument("--ray-address", metavar="HOST:PORT", help="run the clinics on this running "
                     "Ray cluster (simulation.ray_address; docs/scale.md)")
    sim.add_argument("--tracking-uri", help="MLflow tracking server or store (tracking.uri; "
                     "default $MLFLOW_TRACKING_URI, else <runs>/mlflow.db)")
    sim.add_argument("--compare", action="store_true", help="baseline comparison on one split: "
                     "pooled, local-only per clinic and each of --strategies, per seed")
    sim.add_argument("--strategies", help="with --compare: comma list (default "
                     "fedavg,fedprox,fedadam)")
    sim.add_argument("--seeds", help="with --compare: comma list of train.seed values "
                     "(default 0)")
    _split_args(sim)
    sim.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("train", help="pooled (centralised) training with a patient-grouped split")
    t.add_argument("--config", required=True)
    t.add_argument("--manifest", help="overrides data.manifest")
    t.add_argument("--out", help="run folder (default runs/train-<config>-<time>)")
    t.add_argument("--cv", type=int, help="patient-grouped K-fold cross-validation")
    t.add_argument("--seed", type=int)
    t.add_argument("--epochs", type=int, help="overrides train.epochs")
    t.add_argument("--tracking-uri", help="MLflow tracking server or store (tracking.uri)")
    t.set_defaults(func=_cmd_train)

    pr = sub.add_parser("predict", help="predict images with a saved model (CSV + JSON), "
                        "optional saliency maps and HTML sheet")
    pr.add_argument("input", nargs="?", help="an image, a folder of images or a manifest CSV")
    pr.add_argument("--model", required=True, help="run folder (model.pt or model_final.pt) "
                    "or a checkpoint file")
    pr.add_argument("--out", help="output folder (must be new or empty)")
    pr.add_argument("--card", action="store_true", help="print the model card")
    pr.add_argument("--config", help="fail unless the model predicts this config's task")
    pr.add_argument("--saliency", action="store_true", help="saliency overlays per label and "
                    "saliency/sheet.html")
    pr.add_argument("--saliency-limit", type=int, default=20, help="images with saliency maps "
                    "(default 20)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--workers", type=int, default=1, help="decoding threads (0: decode "
                    "between batches)")
    pr.add_argument("--precision", choices=["fp32", "bf16", "int8", "auto"], default="fp32",
                    help="auto: reduced-scale JPEG decoding and the fastest of int8 (an int8 "
                    "export and a CPU with VNNI), bf16 (native bf16) and fp32 whose scores stay "
                    "within 0.05 of fp32 on the first batch; images near a threshold are "
                    "decoded in full and recomputed in fp32, so decisions equal fp32's. fp32 "
                    "runs in ONNX Runtime when `dentfed export` wrote an export of this model")
    pr.add_argument("--min-score", type=float, default=0.5, help="detection models: boxes "
                    "scoring below this are left out (default 0.5)")
    pr.add_argument("--raw-numbers", action="store_true", help="FDI tooth detectors: keep "
                    "the detector's own numbers (no anatomical renumbering)")
    pr.add_argument("--fhir", action="store_true", help="detection models: also an HL7 FHIR "
                    "Bundle per image (images/<n>.fhir.json)")
    pr.add_argument("--fhir-patient", help="FHIR subject reference, e.g. Patient/123 (default: "
                    "none; dentfed never writes a patient id it was not given)")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="write the model as ONNX beside its model file (used by "
                        "predict and serve), and as int8 with --calibrate")
    ex.add_argument("model", help="run folder (model.pt or model_final.pt) or a checkpoint file")
    ex.add_argument("--calibrate", help="images (an image, folder or manifest; the first 64 "
                    "are used) to calibrate an int8 model on")
    ex.set_defaults(func=_cmd_export)

    sv = sub.add_parser("serve", help="upload page and JSON API for one saved model")
    sv.add_argument("--model", required=True, help="run folder or checkpoint file")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-mb", type=float, default=10, help="largest upload (default 10 MB)")
    sv.add_argument("--keep-uploads", help="save each upload here under a random name "
                    "(default: nothing is stored)")
    sv.set_defaults(func=_cmd_serve)

    from dentfed.deploy_cli import add_parsers

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run reports
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.verbose:
        for name in ("dentfed", "shared", "server", "client", "simulations"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except DentfedError as err:
        if os.environ.get("DENTFED_DEBUG"):
            raise
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
