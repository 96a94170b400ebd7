"""PLACEHOLDER for h15a's detection data module (replaced wholesale at merge): the contract
only: read_detection_manifest, DetectionDataset, detection_collate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from shared.data.readers import read_image


def read_detection_manifest(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df


class DetectionDataset(Dataset):
    def __init__(self, frame: pd.DataFrame, root: str | Path, image_size: int, train: bool,
                 augment: bool = True, class_names: list[str] | None = None):
        self.frame, self.root, self.size = frame.reset_index(drop=True), Path(root), image_size
        self.index = {c: k + 1 for k, c in enumerate(class_names or [])}

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int):
        row = self.frame.iloc[i]
        p = Path(row["path"])
        img = read_image(p if p.is_absolute() else self.root / p)
        w, h = img.size
        boxes = json.loads(row["boxes"]) if row["boxes"] else []
        b = torch.tensor([[float(v) for v in bx[1:]] for bx in boxes],
                         dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.index[str(bx[0])] for bx in boxes], dtype=torch.int64)
        t = v2.Compose([v2.ToImage(), v2.Resize((self.size, self.size)),
                        v2.ToDtype(torch.float32, scale=True)])
        x, bb = t(img, tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=(h, w)))
        return x, {"boxes": bb.as_subclass(torch.Tensor), "labels": labels}


def detection_collate(batch):
    return tuple(zip(*batch, strict=True))
