"""The training loop: seeded epochs over cached frozen features, checkpoints, resume, multi-process.

Multi-process (torchrun): every rank walks the same seeded global batches; slice ``i`` belongs to rank
``i % world``, which alone encodes (and caches) it. Each rank's loss is weighted by its share of the
global batch and gradients are summed across ranks (gloo on CPU, NCCL on CUDA), so one step equals the
single-process step on the whole global batch up to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import Dist, init_distributed
from ..engine import parse_modality
from ..errors import InputError
from ..methods import AnomalyMethod, build_method, smooth_maps
from ..methods.checkpoints import load_method_weights, save_method_weights
from .cache import FeatureCache, default_memory_budget, supports_cache
from .config import TrainConfig
from .data import Augmentation, SliceSet, augmented_batch
from .losses import aaclip_loss, method_loss
from .state import consistent_save, keep_previous, load_train_state, save_train_state

ENCODE_CHUNK = 8
"""Slices per frozen-encoder pass when filling the cache (fixed, so cached values never depend on batch order)."""


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def staged_parameters(method: AnomalyMethod, config: TrainConfig) -> list[list[torch.nn.Parameter]] | None:
    """Parameters of each training stage of a two-stage method (AA-CLIP: text, then image), else None."""
    stage_parts = getattr(method, "stage_parts", None)
    if not callable(stage_parts):
        return None
    if config.stages is None:
        raise InputError(f"method {config.method!r} trains in two stages; the config needs 'stages' (see its study defaults)")
    return [[p for module in modules for p in module.parameters()] for modules in stage_parts().values()]


def staged_details(method: AnomalyMethod, images: torch.Tensor, stage: int) -> Any:
    """Stage 0: AA-CLIP's text-stage predictions; stage 1: its image-stage predictions (both differentiable)."""
    from types import SimpleNamespace

    from ..methods.aaclip_stages import image_stage_probs, text_stage_details

    if stage == 0:
        return text_stage_details(method, images)
    probs, det_logits, output = image_stage_probs(method, images)
    return SimpleNamespace(layer_probs=probs, det_logits=det_logits, output=output)


def build_trainable(config: TrainConfig, device: torch.device) -> AnomalyMethod:
    """Build the method (seeded random init, or released / given weights) with only its trainable parts free."""
    torch.manual_seed(config.seed)
    method = build_method(config.method, config.backbone, weights=config.weights, image_size=config.image_size,
                          device=device, init_seed=config.seed, **config.method_options())
    parts = method.trainable_parts()
    if not parts:
        raise InputError(f"method {config.method!r} has no trainable parts (training-free); use setup 'industrial'")
    trainable = {id(p) for part in parts.values() for p in part.parameters()}
    for part in parts.values():
        part.requires_grad_(True)
    frozen = [n for n, p in method.clip.named_parameters() if id(p) not in trainable and p.requires_grad]
    assert not frozen, f"CLIP weights must stay frozen, but {frozen[:3]} require grad"
    method.eval()
    for part in parts.values():
        part.train()
    return method


@dataclass
class Trainer:
    """One training run over ``train`` slices, validated on ``val`` slices, writing into ``run_dir``."""

    config: TrainConfig
    method: AnomalyMethod
    train: SliceSet
    val: SliceSet
    run_dir: Path
    dist: Dist = field(default_factory=Dist)
    progress: bool = True

    def __post_init__(self) -> None:
        self.device = self.method.device
        self.params = [p for part in self.method.trainable_parts().values() for p in part.parameters()]
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.config.optimizer]
        self.stage_params = staged_parameters(self.method, self.config)
        if self.stage_params is None:
            self.optimizer = optimizer(self.params, lr=self.config.lr, betas=tuple(self.config.betas))
        else:  # one param group per stage (state per parameter, as the official separate optimizers); a stage's
            # parameters get no gradient in the other stage, so Adam leaves them and their step counts alone
            groups = [{"params": self.stage_params[0], "lr": self.config.stages["text_lr"]},
                      {"params": self.stage_params[1], "lr": self.config.lr}]
            self.optimizer = optimizer(groups, lr=self.config.lr, betas=tuple(self.config.betas))
            if self.config.epochs <= self.config.stages["text_epochs"] and self.dist.main:
                print(f"note: {self.config.method}: {self.config.epochs} epoch(s) <= the {self.config.stages['text_epochs']} "
                      "stage-1 epochs: only the text adapter trains (epochs count both stages)", file=sys.stderr)
        self.views = self.config.views if self.config.augment else 1
        self.cached = self.config.cache and supports_cache(self.method)
        budget = (default_memory_budget(self.dist.world) if self.config.cache_memory_gb is None
                  else int(self.config.cache_memory_gb * (1 << 30)))
        spill = self.spill_dir = self.run_dir / "feature_cache" / f"rank{self.dist.rank}"
        # Validation holds 1 view of ~1/4 of the slices the training part holds in `views`: a small share.
        self.train_cache = FeatureCache(len(self.train), self.views, int(budget * 0.85), spill / "train")
        self.val_cache = FeatureCache(len(self.val), 1, int(budget * 0.15), spill / "val")
        self.epoch, self.step, self.best = 0, 0, -1.0

    # --- features ----------------------------------------------------------------------------
    def _owned(self, n: int) -> np.ndarray:
        return np.arange(self.dist.rank, n, self.dist.world)

    def _inputs(self, data: SliceSet, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = [k[0] for k in keys]
        augmentations = [Augmentation.draw(self.config.seed, i, v) for i, v in keys]
        backbone = self.method.backbone
        return augmented_batch(data.images[index].to(self.device), data.masks[index].to(self.device), augmentations,
                               self.method.image_size, backbone.mean, backbone.std)

    def _encode(self, images: torch.Tensor) -> Any:
        with torch.no_grad(), _autocast(self.device):
            return self.method.tap_tokens(images)

    def _fill(self, data: SliceSet, cache: FeatureCache, keys: list[tuple[int, int]]) -> None:
        """Encode the fixed chunks (per view, over this rank's slices) that hold missing keys."""
        owned = self._owned(len(data))
        position = {int(i): p for p, i in enumerate(owned)}
        for chunk_key in sorted({(v, position[i] // ENCODE_CHUNK) for i, v in keys if (i, v) not in cache}):
            view, chunk = chunk_key
            members = [(int(i), view) for i in owned[chunk * ENCODE_CHUNK : (chunk + 1) * ENCODE_CHUNK]]
            images, masks = self._inputs(data, members)
            cache.put(members, (self._encode(images), masks))

    def _head(self, features: Any) -> Any:
        with _autocast(self.device):
            if callable(getattr(self.method, "head_details", None)):
                return self.method.head_details(features)
            return self.method.head(features)

    def _forward(self, data: SliceSet, cache: FeatureCache, keys: list[tuple[int, int]]) -> tuple[Any, torch.Tensor]:
        """Head output (differentiable in the trainable parts) and masks for ``keys``."""
        if self.cached:
            self._fill(data, cache, keys)
            features, masks = cache.get(keys, self.device)
            return self._head(features), masks
        images, masks = self._inputs(data, keys)
        if supports_cache(self.method):
            return self._head(self._encode(images)), masks
        with _autocast(self.device):
            if callable(getattr(self.method, "forward_details", None)):
                return self.method.forward_details(images), masks
            return self.method(images), masks

    # --- epochs ------------------------------------------------------------------------------
    def _stage(self, epoch: int) -> int | None:
        """0 (text) or 1 (image) for two-stage methods, None otherwise."""
        if self.stage_params is None:
            return None
        return 0 if epoch <= self.config.stages["text_epochs"] else 1

    def _stage_step(self, details_fn: Any, keys: list[tuple[int, int]], stage: int) -> tuple[Any, torch.Tensor]:
        images, masks = self._inputs(self.train, keys)
        return details_fn(self.method, images, stage), masks

    def train_epoch(self, epoch: int) -> float:
        """One seeded pass over the training slices; returns the mean batch loss."""
        stage = self._stage(epoch)
        n = len(self.train)
        batch = self.config.batch_size if stage != 0 else self.config.stages["text_batch_size"]
        rng = np.random.default_rng([self.config.seed, epoch])
        order, views = rng.permutation(n), rng.integers(0, self.views, size=n)
        batches = [order[s : s + batch] for s in range(0, n, batch)]
        params = self.params if stage is None else self.stage_params[stage]
        if stage == 1:  # stage 2 starts from the anchors of the trained text adapter (computed once, no grad)
            self.method.on_weights_loaded()
            for p in self.stage_params[0]:  # a zero (not None) gradient would let Adam keep moving the text adapter
                p.grad = None
        total, done = 0.0, 0
        bar = _bar(len(batches), f"epoch {epoch}", self.progress and self.dist.main)
        for number, members in enumerate(batches):
            local = [(int(i), int(views[i])) for i in members if i % self.dist.world == self.dist.rank]
            self.optimizer.zero_grad(set_to_none=False)
            loss_value = torch.zeros((), device=self.device)
            if stage == 1:  # train.py: MultiStepLR(milestones, gamma) stepped after every stage-2 batch
                done_steps = (epoch - self.config.stages["text_epochs"] - 1) * len(batches) + number
                decays = sum(done_steps >= m for m in self.config.stages["milestones"])
                self.optimizer.param_groups[1]["lr"] = self.config.lr * self.config.stages["gamma"] ** decays
            if local:
                if stage is None:
                    details, masks = self._forward(self.train, self.train_cache, local)
                    loss = method_loss(details, masks, self.config.method)
                else:
                    details, masks = self._stage_step(staged_details, local, stage)
                    loss = aaclip_loss(details, masks, self.config.stages["text_norm_weight"])
                loss = loss * (len(local) / len(members))
                loss.backward()
                loss_value = loss.detach().float()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.sum_(p.grad)
            self.optimizer.step()
            if stage == 0:  # the anchors moved: validation and stage 2 recompute them
                self.method.on_weights_loaded()
            self.step += 1
            total += float(self.dist.sum_(loss_value.clone()))
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / done:.4f}")
        bar.close()
        return total / max(1, len(batches))

    @torch.no_grad()
    def validate(self) -> float:
        """Pooled Dice of the thresholded (smoothed, [0, 1]) maps over the validation slices."""
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        owned = self._owned(len(self.val))
        for start in range(0, len(owned), ENCODE_CHUNK):
            keys = [(int(i), 0) for i in owned[start : start + ENCODE_CHUNK]]
            details, masks = self._forward(self.val, self.val_cache, keys)
            output = getattr(details, "output", details)
            maps = smooth_maps(output.unit_maps().float(), self.method.default_sigma)
            pred = maps >= self.config.threshold
            gt = masks > 0.5
            counts += torch.stack([(pred & gt).sum(), pred.sum(), gt.sum()]).double()
        inter, pred_sum, gt_sum = self.dist.sum_(counts).tolist()
        return 1.0 if pred_sum + gt_sum == 0 else 2 * inter / (pred_sum + gt_sum)

    # --- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, metrics: dict[str, Any]) -> None:
        """last.safetensors (+ best.safetensors by val_dice), sidecars, and the training state (rank 0)."""
        if not self.dist.main:
            return
        meta = {"setup": self.config.setup, "config": self.config.to_dict(), "epoch": self.epoch, "step": self.step,
                "metrics": metrics, "backbone_label": self.method.backbone.label}
        stamp = {"epoch": self.epoch, "step": self.step}  # in every file's header: a torn save is detected on resume
        keep_previous(self.checkpoints)
        if metrics["val_dice"] > self.best:
            self.best = metrics["val_dice"]
            save_method_weights(self.method, self.checkpoints / "best.safetensors", meta, header=stamp)
        save_train_state(self.checkpoints / "train_state.safetensors", self.optimizer,
                         {"epoch": self.epoch, "step": self.step, "best_val_dice": self.best})
        save_method_weights(self.method, self.checkpoints / "last.safetensors", meta, header=stamp)

    def resume(self) -> None:
        """Continue from the last whole save: checkpoints/last.safetensors and its training state.

        Every file carries the save's epoch and step; when a kill tore the current save, the previous
        one (``*.prev.*``) is used, so the resumed run still ends with bitwise the same weights.
        """
        last = self.checkpoints / "last.safetensors"
        if not last.is_file():
            raise InputError(f"{last}: no checkpoint to resume from; run without --resume")
        weights, state, side, fell_back = consistent_save(self.checkpoints)
        load_method_weights(self.method, weights)
        scalars = load_train_state(state, self.optimizer, side)
        self.epoch, self.step, self.best = int(scalars["epoch"]), int(scalars["step"]), float(scalars["best_val_dice"])
        if fell_back:
            print(f"note: {self.checkpoints}: the save after epoch {self.epoch} was interrupted; resuming from epoch "
                  f"{self.epoch} (its whole previous save)", file=sys.stderr)
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.epoch)

    def fit(self) -> list[dict[str, Any]]:
        """Train from ``self.epoch`` to ``config.epochs``; returns the metrics of the epochs run."""
        history = []
        if self.epoch == 0:
            record = {"epoch": 0, "step": 0, "train_loss": None, "val_dice": self.validate()}
            self._log(record)
            history.append(record)
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            train_loss = self.train_epoch(epoch)
            self.epoch = epoch
            record = {"epoch": epoch, "step": self.step, "train_loss": train_loss, "val_dice": self.validate()}
            self._log(record)
            self.save(record)
            history.append(record)
            if self.config.stop_after_epoch is not None and epoch >= self.config.stop_after_epoch:
                break
        self.train_cache.close()  # frees RAM and deletes spilled files (rebuilt lazily on --resume)
        self.val_cache.close()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last rank out removes the (then empty) folder
            self.spill_dir.parent.rmdir()
        return history

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:  # rewritten whole (atomically): a kill never leaves half a line
            path = self.run_dir / "metrics.jsonl"
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            write_json_lines(path, [*(line for line in lines if line.strip()), json.dumps(record)])


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after ``epoch`` (written by a run killed before its checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                record_epoch = int(record["epoch"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}: line {number} is damaged (not a metrics record: {line[:40]!r}); delete that "
                                 f"line (the checkpoint is at epoch {epoch}) and rerun with --resume") from None
            if record_epoch <= epoch:
                kept.append(line)
        write_json_lines(path, kept)


def write_json_lines(path: Path, lines: list[str]) -> None:
    """Rewrite a .jsonl file atomically."""
    from ..atomic import write_text

    write_text(path, "".join(line + "\n" for line in lines))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not enabled, leave=False)


def modalities_of(config: TrainConfig) -> list[str]:
    """The configured modality list (one, or three as channels)."""
    return parse_modality(config.modality)


__all__ = ["Dist", "Trainer", "build_trainable", "init_distributed", "modalities_of"]
