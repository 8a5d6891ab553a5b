"""SimCLR pretraining: the Trainer, and the evaluation of a saved run.

`pretrain(PretrainConfig(...))` trains, writes `last.pt`, `metrics.jsonl`, `training_curve.png` and
`summary.json` in `config.out` and returns the summary. Checkpoints carry everything a run depends on
(model, optimizer, scheduler, scaler, position in the epoch, every RNG state, the resolved config), so
`resume=True` continues with exactly the losses an uninterrupted run would have produced (unless the
learning rate, temperature or precision were changed on resume: a departure, logged as one).

The recipe and config live in recipes.py, checkpoint IO in checkpoint.py, logging and plots in
metrics.py, the probes in evaluate.py; this module drives them.
"""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as dist_lib
from . import data as data_lib
from .checkpoint import (
    PRETRAIN_FORMAT,
    CheckpointError,
    load_pretrained,
    pack_rng,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint_atomic,
    unpack_rng,
)
from .evaluate import evaluate_encoder, knn_classify, linear_probe, shard_range, sharded_features
from .metrics import MetricsLog, Progress, plot_curve
from .models import build_model
from .optim import build_optimizer, build_scheduler, scaled_lr
from .recipes import AUGMENT_PRESETS, AUGMENT_RECIPES, RECIPES, PretrainConfig, build_augment

__all__ = ["PretrainConfig", "Trainer", "pretrain", "NonFiniteLossError", "MissingDependencyError", "RunDirectoryError",
           "load_pretrained", "linear_eval", "knn_eval", "save_checkpoint_atomic", "build_augment", "AUGMENT_PRESETS",
           "AUGMENT_RECIPES", "RECIPES", "check_dependencies"]

CHECKPOINT = "last.pt"
# Fields a resumed run must share with its checkpoint: anything that changes the sequence of losses,
# except those a user may change to get past a NaN or out of memory (RESUME_MAY_CHANGE), logged as departures.
_RESUME_FIXED = ("dataset", "image_size", "augment", "arch", "width", "pool", "final_relu", "cifar_stem", "head",
                 "proj_dim", "hidden_dim", "epochs", "batch_size", "optimizer", "lr_scaling", "weight_decay",
                 "momentum", "warmup_epochs", "accum_steps", "seed")
RESUME_MAY_CHANGE = ("lr", "temperature", "precision", "grad_cache_chunk")


class NonFiniteLossError(RuntimeError):
    """`max_nonfinite_steps` consecutive steps had a NaN/inf loss or gradients (each one skipped), or the
    parameters became non-finite; the run stopped without overwriting its last good checkpoint."""


class MissingDependencyError(ImportError):
    """A package the run needs is not installed; the message names it and the extra that installs it."""


class RunDirectoryError(ValueError):
    """The run directory already holds a checkpoint and neither resume nor overwrite was asked for."""


def check_dependencies(cfg: PretrainConfig) -> None:
    """Before any work: the packages this run needs ([train] extra), one line naming what is missing.
    tqdm, matplotlib and tensorboard are optional (plain progress lines, no plot, no TensorBoard)."""
    needs = []
    if cfg.dataset == "digits":
        needs.append(("sklearn", "scikit-learn", "the digits dataset"))
    if cfg.dataset != "digits" or (cfg.arch or "").startswith("resnet"):
        needs.append(("torchvision", "torchvision", f"the {cfg.dataset} dataset / the {cfg.arch} encoder"))
    missing = [(pkg, why) for module, pkg, why in needs if importlib.util.find_spec(module) is None]
    if missing:
        names = ", ".join(f"{pkg} (for {why})" for pkg, why in missing)
        raise MissingDependencyError(f"pretraining needs {names}, not installed: pip install 'simclr_ext[train]'")


def _fresh_model(cfg: PretrainConfig, channels: int) -> nn.Module:
    """The model at its (seeded) initialization; also the random-init baseline of the evaluation."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.arch, channels, cfg.width, cfg.cifar_stem, cfg.head, cfg.proj_dim, cfg.hidden_dim, cfg.pool,
                       cfg.final_relu)


def _init_distributed(device: str) -> None:
    """Join the process group torchrun describes (env://) when WORLD_SIZE > 1 and nobody did yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend)
            return
        # torchrun's agent keeps one TCP store across restarts of the group (its default, store sharing), so the
        # keys a failed attempt's process group wrote (gloo's peer addresses, NCCL's unique id) are still there
        # and a restarted rank can read a dead peer's address ("Connection refused" in gloo's connectFullMesh,
        # every restart failing the same way). A key prefix per attempt keeps the attempts apart.
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=dist.PrefixStore(f"simclr_ext/attempt_{attempt}", store), rank=rank,
                                world_size=world)


def _elastic_restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this worker group (0: the first attempt, or
    not under torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def _to_device(images, device):
    if isinstance(images, (list, tuple)):  # ragged ImageFolder batch: the fused op takes the list
        return [im.to(device, non_blocking=True) for im in images]
    return images.to(device, non_blocking=True)


class Trainer:
    """One SimCLR run. Construct, optionally replace `criterion`, then `run()`."""

    def __init__(self, config: PretrainConfig):
        self.t0 = time.time()
        self.cfg = config.resolved()
        cfg = self.cfg
        check_dependencies(cfg)
        self.out = cfg.out
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        self.elastic_restart = _elastic_restart_count()
        if self.elastic_restart and not cfg.resume:
            self._continue_after_elastic_restart()
        self._check_run_directory()
        _init_distributed(cfg.device)
        self.rank, self.world = dist_lib.world_info()
        self.distributed = self.world > 1
        if cfg.device.startswith("cuda") and self.distributed:
            local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
            cfg.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        self.device = torch.device(cfg.device)
        self.is_main = self.rank == 0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the world size ({self.world})")

        self.splits = data_lib.load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size)
        cfg.image_size = self.splits.image_size
        cfg.augment = cfg.augment or self.splits.augment
        self.steps_per_epoch = len(self.splits.pretrain) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the {cfg.dataset} pretraining set "
                             f"({len(self.splits.pretrain)} images)")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # both views of a batch in one fused op, on the training device; per-sample parameters are drawn
        # from self.aug_gen (a CPU generator, checkpointed), so a resumed run sees the same views
        self.aug = build_augment(cfg.augment, cfg.dataset, cfg.image_size, self.splits.mean, self.splits.std)

        self.model = _fresh_model(cfg, self.splits.channels).to(self.device)
        if self.distributed and cfg.sync_bn and self.device.type == "cuda":  # SyncBatchNorm is CUDA-only
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling),
                                         cfg.weight_decay, cfg.momentum)
        self.scheduler = build_scheduler(self.optimizer, int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                         self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.net = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                        if self.device.type == "cuda" else None)
                    if self.distributed else self.model)
        from ..loss import NTXentLoss
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=self.distributed)
        self.grad_cache = self._build_grad_cache() if cfg.grad_cache_chunk else None

        self.aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.order_state = self.order_gen.get_state()  # at the start of the current epoch
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: List[dict] = []      # one row per finished epoch
        self.departures: List[dict] = []   # settings changed on resume: {"step", "changes"}
        self.step_losses: List[float] = []
        self.nonfinite_steps, self.nonfinite_streak = 0, 0  # skipped steps: in all, and in a row now
        self._stop_requested = False
        self._new_departure: Optional[dict] = None
        if cfg.resume:
            self._load(self.ckpt_path)
            if self.elastic_restart and self.is_main:
                print(f"simclr-ext: elastic restart {self.elastic_restart}: resumed from "
                      f"{os.path.abspath(self.ckpt_path)!r} at global step {self.global_step}", file=sys.stderr,
                      flush=True)

    def _continue_after_elastic_restart(self) -> None:
        """torchrun restarted the group after a worker failed (TORCHELASTIC_RESTART_COUNT > 0): continue from
        the checkpoint this job wrote (its rendezvous id, TORCHELASTIC_RUN_ID, is in the checkpoint), without
        --resume. No checkpoint yet: start over, dropping the TensorBoard events of the failed attempt
        (metrics.jsonl is rewritten anyway). A checkpoint of another job is left to the usual rules."""
        cfg = self.cfg
        if not os.path.exists(self.ckpt_path):
            if int(os.environ.get("RANK", "0")) == 0:
                shutil.rmtree(os.path.join(self.out, "tb"), ignore_errors=True)
            return
        job = os.environ.get("TORCHELASTIC_RUN_ID")
        try:
            written_by = read_checkpoint(self.ckpt_path).get("elastic_run_id")
        except CheckpointError:
            return  # _load or _check_run_directory reports it
        if job is not None and written_by == job:
            cfg.resume, cfg.overwrite = True, False

    def _check_run_directory(self) -> None:
        """A fresh run never silently replaces a checkpoint: it needs --resume or --overwrite."""
        cfg = self.cfg
        if cfg.resume or not os.path.exists(self.ckpt_path):
            return
        if not cfg.overwrite:
            raise RunDirectoryError(f"run directory {os.path.abspath(self.out)!r} already holds a checkpoint "
                                    f"({CHECKPOINT}): pass --resume to continue it or --overwrite to start over")
        if dist_lib.world_info()[0] == 0 and int(os.environ.get("RANK", "0")) == 0:
            for name in (CHECKPOINT, "metrics.jsonl", "summary.json", "training_curve.png"):
                if os.path.exists(os.path.join(self.out, name)):
                    os.remove(os.path.join(self.out, name))
            shutil.rmtree(os.path.join(self.out, "tb"), ignore_errors=True)

    # ----- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        aug_states = [self.aug_gen.get_state()]
        if self.distributed:
            aug_states = [None] * self.world
            dist.all_gather_object(aug_states, self.aug_gen.get_state())
        rng = pack_rng()
        rng.update(augment=aug_states, data_order=self.order_state)
        return {
            "format": PRETRAIN_FORMAT,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "rng": rng, "config": dataclasses.asdict(self.cfg), "history": self.history,
            "departures": self.departures, "world_size": self.world,
            "nonfinite_steps": self.nonfinite_steps, "nonfinite_streak": self.nonfinite_streak,
            "elastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        }

    def save(self) -> None:
        self._check_parameters_finite()
        state = self._state()  # collective under DDP: every rank takes part, rank 0 writes
        if self.is_main:
            save_checkpoint_atomic(state, self.ckpt_path)

    def _last_good(self) -> str:
        where = os.path.abspath(self.ckpt_path)
        if os.path.exists(where):
            return f"The last good checkpoint is {where!r}."
        return f"No checkpoint was written yet ({where!r})."

    def _check_parameters_finite(self) -> None:
        """A checkpoint never holds NaN/inf weights: a finite step can still overflow them (a huge lr)."""
        bad = [name for name, t in self.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteLossError(
                f"the parameters became non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) by "
                f"global step {self.global_step}; stopped without saving. {self._last_good()} "
                "Try a lower --lr (--resume accepts a change of it).")

    def _load(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: no checkpoint at {os.path.abspath(path)!r} (run without --resume first)")
        state = read_checkpoint(path)
        saved = state["config"]
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(self.cfg, k)!r}"
                   for k in _RESUME_FIXED if saved.get(k) != getattr(self.cfg, k)]
        if state["world_size"] != self.world:
            changed.append(f"world size: {state['world_size']} vs {self.world}")
        if changed:
            raise ValueError("resume: the run's settings differ from the checkpoint's: " + "; ".join(changed))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"] or not self.scaler.is_enabled():  # fp16 now, not before: a fresh scaler
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {os.path.abspath(path)!r} does not fit this run's model/optimizer: "
                                  f"{' '.join(str(e).split())[:200]}") from None
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        rng = state["rng"]
        unpack_rng(rng)
        self.aug_gen.set_state(rng["augment"][self.rank].cpu())
        self.order_state = rng["data_order"].cpu()
        self.order_gen.set_state(self.order_state)
        self.history = list(state["history"])
        self.departures = list(state.get("departures", []))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        changes = {k: [saved.get(k), getattr(self.cfg, k)] for k in RESUME_MAY_CHANGE
                   if saved.get(k) != getattr(self.cfg, k)}
        if changes:
            self._apply_lr()
            self._new_departure = {"step": self.global_step, "changes": changes}
            self.departures.append(self._new_departure)

    def _apply_lr(self) -> None:
        """The schedule continues from where it was, scaled to the (possibly changed) base lr."""
        base = scaled_lr(self.cfg.lr, self.cfg.batch_size, self.cfg.lr_scaling)
        self.scheduler.base_lrs = [base for _ in self.scheduler.base_lrs]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = base
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ----- training ----------------------------------------------------------------------------
    def _epoch_batches(self):
        """This rank's index batches of the current epoch, from the data-order generator (the state
        saved at the start of the epoch reproduces the permutation on resume)."""
        self.order_state = self.order_gen.get_state()
        perm = torch.randperm(len(self.splits.pretrain), generator=self.order_gen)
        per_rank = self.cfg.batch_size // self.world
        used = perm[: self.steps_per_epoch * self.cfg.batch_size].view(self.steps_per_epoch, self.world, per_rank)
        return used[:, self.rank]

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self, images):
        """One optimizer step over `accum_steps` micro-batches. Returns (mean loss across ranks, finite):
        a step whose loss or gradients are not finite on any rank is skipped on every rank (`_skip_step`)."""
        buffers = [b.detach().clone() for b in self.model.buffers()]  # BatchNorm statistics before the step
        v1, v2 = self.aug(_to_device(images, self.device), generator=self.aug_gen)
        micro = v1.shape[0] // self.cfg.accum_steps
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(self.cfg.accum_steps):
            last = i == self.cfg.accum_steps - 1
            sync = nullcontext() if (last or not self.distributed) else self.net.no_sync()
            with sync:
                loss = self._micro_step(v1[i * micro:(i + 1) * micro], v2[i * micro:(i + 1) * micro])
            total += loss.double() / self.cfg.accum_steps
        # 1 when a gradient holds a NaN/inf; under fp16 the grad scaler owns that case (an overflow of the
        # scaled gradients skips the step and lowers the scale, its normal operation), so only the loss counts
        bad_grads = torch.zeros((), device=self.device, dtype=torch.float64)
        if not self.scaler.is_enabled():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads and not torch.stack([g.isfinite().all() for g in grads]).all():
                bad_grads.fill_(1)
        if self.distributed:  # one collective: every rank takes the same decision
            flags = torch.stack([total, bad_grads, torch.tensor(float(self._stop_requested), device=self.device,
                                                                dtype=torch.float64)])
            dist.all_reduce(flags)
            total, bad_grads, self._stop_requested = flags[0] / self.world, flags[1], bool(flags[2] > 0)
        loss_value = float(total)
        if not math.isfinite(loss_value) or bool(bad_grads > 0):
            self._skip_step(buffers)
            return loss_value, False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, True

    def _skip_step(self, buffers) -> None:
        """Undo what a non-finite step did: its gradients are dropped and the BatchNorm statistics its forward
        updated are restored; the optimizer (and the fp16 grad scaler) do not step. The scheduler does: the lr
        stays a function of the position in the run, so the schedule still ends where it was planned."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        self.scheduler.step()

    def _count_nonfinite(self, loss: float) -> Optional[NonFiniteLossError]:
        """Counts a skipped step with one warning line; returns the error that stops the run once
        max_nonfinite_steps consecutive steps were skipped (raised after the step's metrics row is written)."""
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        limit = self.cfg.max_nonfinite_steps
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step})"
        if self.is_main:
            what = f"loss {loss}" if not math.isfinite(loss) else f"loss {loss:.4f} with non-finite gradients"
            print(f"simclr-ext: warning: {what} at {where}: step skipped ({self.nonfinite_streak} in a row, "
                  f"{self.nonfinite_steps} in this run; the run stops at {limit} in a row)", file=sys.stderr,
                  flush=True)
        if self.nonfinite_streak < limit:
            return None
        steps = f"{limit} consecutive steps" if limit > 1 else "a step"
        return NonFiniteLossError(
            f"non-finite loss or gradients in {steps} (--max-nonfinite-steps {limit}), the last at {where} with "
            f"loss {loss}; stopped without saving. {self._last_good()} Try a lower --lr, fp32 precision or a larger "
            f"--temperature: --resume accepts a change of these three (logged as a departure from the uninterrupted "
            f"run).")

    def _embed(self, a: torch.Tensor, b: torch.Tensor):
        """(z1, z2) of two views, both in one forward (BatchNorm sees both); the loss takes them in float32."""
        with self._autocast():
            _, z = self.net(torch.cat([a, b]))
        return z.float().chunk(2)

    def _build_grad_cache(self):
        """--grad-cache-chunk K: each micro-batch encoded K images (both views) at a time, the loss over the
        whole micro-batch; DDP synchronizes once per micro-batch (nested in the accumulation's no_sync)."""
        from ..grad_cache import GradCache

        def micro_batch_share(z1, z2):  # the step's gradient is the mean over its micro-batches
            return self.criterion(z1, z2) / self.cfg.accum_steps
        return GradCache(self._embed, micro_batch_share, self.cfg.grad_cache_chunk, modules=self.net,
                         scaler=self.scaler)

    def _micro_step(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One micro-batch (views a, b): its gradients accumulated, its loss returned (detached). Uncached:
        one forward and backward; with gradient caching: the same gradients (BatchNorm statistics per chunk)
        at the activation memory of one chunk."""
        if self.grad_cache is not None:
            return self.grad_cache.step((a, b)) * self.cfg.accum_steps
        loss = self.criterion(*self._embed(a, b))
        self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: stop now, no checkpoint
            raise KeyboardInterrupt
        self._stop_requested = True

    def run(self) -> Dict:
        """Train (from the checkpoint when resuming), then evaluate and write summary.json."""
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            remove_stale_temporaries(self.out)  # left by a write that a kill interrupted
        handler_installed = False
        try:
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            handler_installed = True
        except ValueError:  # not the main thread: Ctrl-C cannot reach us here anyway
            previous = None
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:  # the small recipe's tiny tensors run fastest on one thread
            torch.set_num_threads(self.cfg.threads)
        try:
            self._train_loop()
            if self._stop_requested:
                raise KeyboardInterrupt(f"interrupted; checkpoint written to {os.path.abspath(self.ckpt_path)!r} "
                                        "(continue with --resume)")
            return self._finish()
        finally:
            torch.set_num_threads(threads)
            if handler_installed:
                signal.signal(signal.SIGINT, previous)

    def _log_departure(self, metrics: Optional[MetricsLog]) -> None:
        d = self._new_departure
        if d is None or not self.is_main:
            return
        text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in d["changes"].items())
        print(f"simclr-ext: resuming at step {d['step']} with {text}: a departure from the uninterrupted run "
              "(its losses will differ from here on)", file=sys.stderr, flush=True)
        if metrics:
            metrics.write(kind="departure", step=d["step"], changes=d["changes"])

    def _train_loop(self) -> None:
        cfg = self.cfg
        metrics = None
        if self.is_main:
            metrics = MetricsLog(self.out, self.global_step if cfg.resume else None, self.epoch)
        self._log_departure(metrics)
        progress = Progress(self.total_steps, self.global_step, cfg.progress and self.is_main)
        try:
            while self.epoch < cfg.epochs:
                # order_state is this epoch's start: on resume mid-epoch the same permutation comes
                # back and the finished steps are skipped
                self.order_gen.set_state(self.order_state)
                batches = self._epoch_batches()
                t_epoch, seen, losses = time.time(), 0, []
                flat = batches[self.step_in_epoch:].reshape(-1)
                for images, _ in self.splits.pretrain.batches(flat, batches.shape[1], cfg.num_workers):
                    t = time.time()
                    loss, finite = self._train_step(images)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    seen += len(images) * self.world
                    self.step_losses.append(loss)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if finite:
                        losses.append(loss)
                        self.nonfinite_streak = 0
                    stop = None if finite else self._count_nonfinite(loss)
                    if metrics:  # a non-finite loss is logged as null (JSON has no NaN)
                        metrics.write(epoch=self.epoch + 1, step=self.global_step,
                                      loss=loss if math.isfinite(loss) else None, lr=lr, skipped=not finite,
                                      nonfinite_steps=self.nonfinite_steps)
                    if stop is not None:
                        raise stop
                    progress.step(self.epoch + 1, cfg.epochs, loss, lr,
                                  len(images) * self.world / max(time.time() - t, 1e-9))
                    if self._stop_requested:
                        self.save()
                        return
                epoch_row = {"epoch": self.epoch + 1, "step": self.global_step,
                             "loss": float(np.mean(losses)) if losses else float("nan"),
                             "images_per_s": seen / max(time.time() - t_epoch, 1e-9)}
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.order_state = self.order_gen.get_state()
                if cfg.knn_every and self.epoch % cfg.knn_every == 0:
                    epoch_row["knn_top1"] = self._knn_monitor()  # every rank takes part
                self.history.append(epoch_row)
                progress.epoch(epoch_row, cfg.epochs, self.optimizer.param_groups[0]["lr"])
                if metrics:
                    metrics.write(**epoch_row, kind="epoch")
                if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
                    self.save()
        finally:
            progress.close()
            if metrics:
                metrics.close()

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm running statistics on every rank before evaluating: DDP broadcasts them at the
        start of each forward, so after the last step every other rank holds its own batch's update."""
        if self.distributed:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def _features(self, images, gather: bool) -> torch.Tensor:
        s = self.splits
        return sharded_features(self.model.encoder, images, s.image_size, s.mean, s.std, self.device,
                                num_workers=self.cfg.num_workers, gather=gather)

    def _knn_monitor(self) -> float:
        """kNN top-1 on the validation split (never the test split: the monitor guides tuning)."""
        s = self.splits
        self._sync_buffers()
        train = self._features(s.train, gather=True)
        val = self._features(s.validation, gather=False)
        lo, hi = shard_range(len(s.validation), self.rank, self.world)
        return knn_classify(train, s.train.labels, val, s.validation.labels[lo:hi], self.cfg.knn_k,
                            self.cfg.knn_temperature, s.num_classes)

    # ----- the end of a run --------------------------------------------------------------------
    def _finish(self) -> Dict:
        cfg = self.cfg
        summary: Dict = {"dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
                         "final_loss": self.history[-1]["loss"] if self.history else None,
                         "augmentation": repr(self.aug)}
        if cfg.eval:
            self._sync_buffers()
            summary.update(self._evaluate())  # every rank takes part
        if self.departures:
            summary["departures"] = self.departures
        if self.is_main:
            summary["wall_seconds"] = time.time() - self.t0
            summary["config"] = dataclasses.asdict(cfg)
            save_json_atomic(summary, os.path.join(self.out, "summary.json"))
            plot_curve(self.history, os.path.join(self.out, "training_curve.png"))
        return summary

    def _evaluate(self) -> Dict[str, float]:
        s, cfg = self.splits, self.cfg
        kw = dict(device=self.device, num_workers=cfg.num_workers, validation=s.validation, num_classes=s.num_classes,
                  knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, shots=cfg.fewshot_shots,
                  draws=cfg.fewshot_draws, seed=cfg.seed)
        trained = evaluate_encoder(self.model.encoder, s.train, s.test, s.image_size, s.mean, s.std, **kw)
        baseline = _fresh_model(cfg, s.channels).to(self.device)
        random_init = evaluate_encoder(baseline.encoder, s.train, s.test, s.image_size, s.mean, s.std, **kw)
        out = dict(trained)
        out.update({f"random_init_{k}": v for k, v in random_init.items()})
        out["validation_images"] = len(s.validation)
        out["test_images"] = len(s.test)
        return out


def save_json_atomic(obj, path: str) -> None:
    """json.dump to a temporary file beside `path`, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def pretrain(config: Optional[PretrainConfig] = None, **overrides) -> Dict:
    """Run SimCLR pretraining (Chen et al. 2020) and return the summary (also written to
    `<out>/summary.json`): linear_top1, knn_top1, fewshot_top1 of the test split, the same with a
    "validation_" prefix for the validation split, and their random_init_* baselines, as fractions,
    plus wall_seconds. Keyword overrides replace config fields."""
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    return Trainer(config).run()


# ----- evaluating a saved run ----------------------------------------------------------------------
def _eval_setup(checkpoint, data_dir, download, device):
    model, cfg = load_pretrained(checkpoint, device)
    s = data_lib.load_dataset(cfg.dataset, data_dir or cfg.data_dir, download, cfg.image_size)
    rank, world = dist_lib.world_info()
    feats = lambda images, gather: sharded_features(model.encoder, images, s.image_size, s.mean, s.std,  # noqa: E731
                                                    cfg.device, num_workers=cfg.num_workers, gather=gather)
    lo, hi = shard_range(len(s.test), rank, world)
    return feats(s.train, True), feats(s.test, False), s.test.labels[lo:hi], s


def linear_eval(checkpoint: str, data_dir: Optional[str] = None, download: bool = False,
                device: Optional[str] = None, weight_decay: float = 1e-4) -> Dict[str, float]:
    """Linear probe of a checkpoint's frozen encoder: {"top1", "top5"} on the test split."""
    tr, te, te_y, s = _eval_setup(checkpoint, data_dir, download, device)
    return linear_probe(tr, s.train.labels, te, te_y, s.num_classes, weight_decay)


def knn_eval(checkpoint: str, k: int = 200, temperature: float = 0.1, data_dir: Optional[str] = None,
             download: bool = False, device: Optional[str] = None) -> float:
    """Weighted kNN top-1 (cosine, k nearest, weights exp(sim / temperature)) of a checkpoint's encoder."""
    tr, te, te_y, s = _eval_setup(checkpoint, data_dir, download, device)
    return knn_classify(tr, s.train.labels, te, te_y, k, temperature, s.num_classes)
