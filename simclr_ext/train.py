"""SimCLR pretraining: the config, the trainer, checkpoints, and evaluation of a saved run.

`pretrain(PretrainConfig(...))` trains, writes `last.pt`, `metrics.jsonl`, `training_curve.png` and
`summary.json` in `config.out` and returns the summary. Checkpoints carry everything a run depends on
(model, optimizer, scheduler, scaler, position in the epoch, every RNG state, the resolved config),
so `resume=True` continues with exactly the losses an uninterrupted run would have produced.
"""
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as data_lib
from . import distributed as dist_lib
from .augment import SimCLRAugment
from .evaluate import evaluate_encoder, extract_features, knn_classify, linear_probe
from .models import build_model
from .optim import build_optimizer, build_scheduler, scaled_lr

__all__ = ["PretrainConfig", "Trainer", "pretrain", "NonFiniteLossError", "load_pretrained", "linear_eval",
           "knn_eval", "save_checkpoint_atomic", "build_augment", "AUGMENT_PRESETS", "AUGMENT_RECIPES"]

CHECKPOINT = "last.pt"
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields a resumed run must share with its checkpoint: anything that changes the sequence of losses.
_RESUME_FIXED = ("dataset", "image_size", "augment", "arch", "width", "pool", "final_relu", "cifar_stem", "head", "proj_dim",
                 "hidden_dim", "epochs", "batch_size", "optimizer", "lr", "lr_scaling", "weight_decay", "momentum",
                 "warmup_epochs", "temperature", "precision", "accum_steps", "seed")


# Defaults of the fields a PretrainConfig leaves None. "small" was tuned on the embedded digits
# (2-core CPU, 100 epochs: benchmarks/results/train_digits_cpu.md): width 32, global average pooling
# and no ReLU on the features (centred pooled BN outputs) give the few-label gap over random init and
# the kNN accuracy together; MNIST uses it untuned. "paper" is SimCLR's CIFAR/ImageNet recipe.
RECIPES = {
    "small": dict(arch="small_cnn", width=32, pool=1, final_relu=False, batch_size=128, optimizer="adamw", lr=8e-3,
                  lr_scaling="none", weight_decay=1e-5, temperature=0.5, threads=1),
    "paper": dict(arch="resnet18", width=32, batch_size=512, optimizer="lars", lr=0.3, lr_scaling="linear",
                  weight_decay=1e-6, temperature=0.5),
}

# The SimCLRAugment presets `augment` may name, and the per-dataset overrides of the dataset's own preset
# (a run that picks another preset with --augment gets that preset as it is, with the dataset's mean/std).
AUGMENT_PRESETS = ("digits", "mnist", "cifar10", "stl10", "imagenet")
AUGMENT_RECIPES: Dict[str, dict] = {
    "digits": dict(scale=(0.5, 1.0), ratio=(0.8, 1.25), rotation_degrees=15.0, jitter_strength=0.5),
}


def build_augment(preset: str, dataset: str, size: int, mean, std) -> SimCLRAugment:
    """The two-view augmentation of a run: SimCLRAugment's `preset` at `size`, normalized with the dataset's
    statistics, with the dataset's recipe overrides (`AUGMENT_RECIPES`) when `preset` is its default."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {list(AUGMENT_PRESETS)}, got {preset!r}")
    default = data_lib.DEFAULT_AUGMENT.get(dataset)
    overrides = dict(AUGMENT_RECIPES.get(dataset, {})) if preset == default else {}
    return SimCLRAugment.preset(preset, size=size, mean=tuple(mean), std=tuple(std), **overrides)


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on. Fields left None are resolved from the dataset's
    recipe (`RECIPES`: digits/MNIST train a small CNN with AdamW on a CPU in minutes; the others follow
    the SimCLR paper: ResNet-18, LARS with lr 0.3 * B / 256, batch 512, CIFAR stem up to 64 px) and
    from the machine."""
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    augment: Optional[str] = None
    arch: Optional[str] = None
    width: Optional[int] = None
    pool: Optional[int] = None           # small CNN: output grid side (1 = global average pooling)
    final_relu: Optional[bool] = None    # small CNN: a ReLU after the last conv-BN (the features' sign)
    cifar_stem: Optional[bool] = None
    head: str = "simclr"
    proj_dim: int = 128
    hidden_dim: Optional[int] = None
    epochs: int = 100
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    lr_scaling: Optional[str] = None
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    temperature: Optional[float] = None
    precision: str = "fp32"
    accum_steps: int = 1
    sync_bn: bool = True                 # under DDP on CUDA
    seed: int = 0
    out: str = "runs/simclr"
    resume: bool = False
    device: Optional[str] = None
    num_workers: int = 0
    threads: Optional[int] = None        # torch CPU threads during the run (recipe; None: torch's choice)
    knn_every: int = 20
    checkpoint_every: int = 1
    eval: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    fewshot_shots: int = 5
    fewshot_draws: int = 5
    progress: bool = True

    def resolved(self) -> "PretrainConfig":
        """A copy with every None filled in and every field checked."""
        c = dataclasses.replace(self)
        if c.dataset not in data_lib.DATASETS:
            raise ValueError(f"dataset must be one of {list(data_lib.DATASETS)}, got {c.dataset!r}")
        recipe = RECIPES["small" if c.dataset in ("digits", "mnist") else "paper"]
        for name, value in recipe.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        if c.cifar_stem is None:
            c.cifar_stem = c.dataset not in ("stl10", "imagefolder") or (c.image_size or 224) <= 64
        c.device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if c.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {c.precision!r}")
        if c.precision == "fp16" and not c.device.startswith("cuda"):
            raise ValueError(f"precision 'fp16' needs a CUDA device (got device {c.device!r}); use bf16 on the CPU")
        if c.augment is not None and c.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {list(AUGMENT_PRESETS)}, got {c.augment!r}")
        if c.pool is None:
            c.pool = 2
        if c.final_relu is None:
            c.final_relu = True
        if c.pool < 1:
            raise ValueError(f"pool must be >= 1, got {c.pool}")
        if c.threads is not None and c.threads < 1:
            raise ValueError(f"threads must be >= 1, got {c.threads}")
        for name in ("epochs", "batch_size", "accum_steps", "checkpoint_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if c.batch_size % c.accum_steps:
            raise ValueError(f"batch_size ({c.batch_size}) must be divisible by accum_steps ({c.accum_steps})")
        if c.temperature <= 0 or c.lr < 0 or c.warmup_epochs < 0:
            raise ValueError(f"need temperature > 0, lr >= 0, warmup_epochs >= 0; got {c.temperature}, {c.lr}, {c.warmup_epochs}")
        return c


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint."""


def save_checkpoint_atomic(state: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a crash) never
    sees a half-written checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fresh_model(cfg: PretrainConfig, channels: int) -> nn.Module:
    """The model at its (seeded) initialization; also the random-init baseline of the evaluation."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.arch, channels, cfg.width, cfg.cifar_stem, cfg.head, cfg.proj_dim, cfg.hidden_dim, cfg.pool, cfg.final_relu)


def _init_distributed(device: str) -> None:
    """Join the process group torchrun describes (env://) when WORLD_SIZE > 1 and nobody did yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


class Trainer:
    """One SimCLR run. Construct, optionally replace `criterion`, then `run()`."""

    def __init__(self, config: PretrainConfig):
        self.t0 = time.time()
        self.cfg = config.resolved()
        cfg = self.cfg
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
        self.effective_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.effective_lr, cfg.weight_decay, cfg.momentum)
        self.scheduler = build_scheduler(self.optimizer, int(round(cfg.warmup_epochs * self.steps_per_epoch)), self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.net = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.distributed else self.model)
        from .loss import NTXentLoss
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=self.distributed)

        self.aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.order_state = self.order_gen.get_state()  # at the start of the current epoch
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: List[dict] = []      # one row per finished epoch
        self.step_losses: List[float] = []
        self._stop_requested = False
        self.out = cfg.out
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        if cfg.resume:
            self._load(self.ckpt_path)

    # ----- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        aug_states = [self.aug_gen.get_state()]
        if self.distributed:
            aug_states = [None] * self.world
            dist.all_gather_object(aug_states, self.aug_gen.get_state())
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "augment": aug_states, "data_order": self.order_state},
            "config": dataclasses.asdict(self.cfg), "effective_lr": self.effective_lr,
            "history": self.history, "world_size": self.world,
        }

    def save(self) -> None:
        state = self._state()  # collective under DDP: every rank takes part, rank 0 writes
        if self.is_main:
            save_checkpoint_atomic(state, self.ckpt_path)

    def _load(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: no checkpoint at {os.path.abspath(path)!r} (run without --resume first)")
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(self.cfg, k)!r}"
                   for k in _RESUME_FIXED if saved.get(k) != getattr(self.cfg, k)]
        if changed or state["world_size"] != self.world:
            changed += [] if state["world_size"] == self.world else [f"world size: {state['world_size']} vs {self.world}"]
            raise ValueError("resume: the run's settings differ from the checkpoint's: " + "; ".join(changed))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.aug_gen.set_state(rng["augment"][self.rank].cpu())
        self.order_state = rng["data_order"].cpu()
        self.order_gen.set_state(self.order_state)
        self.history = list(state["history"])

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

    def _train_step(self, images: torch.Tensor) -> float:
        """One optimizer step over `accum_steps` micro-batches; returns the mean loss across ranks."""
        v1, v2 = self.aug(images.to(self.device, non_blocking=True), generator=self.aug_gen)
        micro = v1.shape[0] // self.cfg.accum_steps
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(self.cfg.accum_steps):
            last = i == self.cfg.accum_steps - 1
            sync = nullcontext() if (last or not self.distributed) else self.net.no_sync()
            with sync:
                x = torch.cat([v1[i * micro:(i + 1) * micro], v2[i * micro:(i + 1) * micro]])
                with self._autocast():
                    _, z = self.net(x)
                z1, z2 = z.float().chunk(2)
                loss = self.criterion(z1, z2)
                if not torch.isfinite(loss):
                    self._non_finite(loss)
                self.scaler.scale(loss / self.cfg.accum_steps).backward()
            total += loss.detach().double() / self.cfg.accum_steps
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.distributed:
            flags = torch.stack([total, torch.tensor(float(self._stop_requested), device=self.device, dtype=torch.float64)])
            dist.all_reduce(flags)
            total, self._stop_requested = flags[0] / self.world, bool(flags[1] > 0)
        return float(total)

    def _non_finite(self, loss: torch.Tensor) -> None:
        raise NonFiniteLossError(
            f"loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} (global step "
            f"{self.global_step + 1}); stopped without saving. The last good checkpoint is "
            f"{os.path.abspath(self.ckpt_path)!r}. Try a lower --lr, fp32 precision or a larger --temperature.")

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: stop now, no checkpoint
            raise KeyboardInterrupt
        self._stop_requested = True

    def run(self) -> Dict:
        """Train (from the checkpoint when resuming), then evaluate and write summary.json."""
        os.makedirs(self.out, exist_ok=True) if self.is_main else None
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

    def _train_loop(self) -> None:
        cfg = self.cfg
        metrics = _Metrics(self.out, append=cfg.resume) if self.is_main else None
        bar = _progress(self.total_steps, self.global_step, cfg.progress and self.is_main)
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
                    loss = self._train_step(images)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    seen += images.shape[0] * self.world
                    losses.append(loss)
                    self.step_losses.append(loss)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if metrics:
                        metrics.write(epoch=self.epoch + 1, step=self.global_step, loss=loss, lr=lr)
                    if bar is not None:
                        bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images.shape[0] * self.world / max(time.time() - t, 1e-9):.0f}")
                        bar.update(1)
                    if self._stop_requested:
                        self.save()
                        return
                epoch_row = {"epoch": self.epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                             "images_per_s": seen / max(time.time() - t_epoch, 1e-9)}
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.order_state = self.order_gen.get_state()
                if cfg.knn_every and self.epoch % cfg.knn_every == 0 and self.is_main:
                    epoch_row["knn_top1"] = self._knn_monitor()
                    if bar is not None:
                        bar.write(f"epoch {self.epoch}: loss {epoch_row['loss']:.4f}, kNN top-1 {100 * epoch_row['knn_top1']:.2f}%")
                self.history.append(epoch_row)
                if metrics:
                    metrics.write(**epoch_row, kind="epoch")
                if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if metrics:
                metrics.close()

    def _knn_monitor(self) -> float:
        s = self.splits
        tr = extract_features(self.model.encoder, s.train, s.image_size, s.mean, s.std, device=self.device)
        te = extract_features(self.model.encoder, s.test, s.image_size, s.mean, s.std, device=self.device)
        return knn_classify(tr, s.train.labels, te, s.test.labels, self.cfg.knn_k, self.cfg.knn_temperature)

    # ----- the end of a run --------------------------------------------------------------------
    def _finish(self) -> Dict:
        cfg = self.cfg
        summary: Dict = {"dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
                         "final_loss": self.history[-1]["loss"] if self.history else None,
                         "augmentation": repr(self.aug)}
        if self.is_main:
            _plot_curve(self.history, os.path.join(self.out, "training_curve.png"))
            if cfg.eval:
                summary.update(self._evaluate())
            summary["wall_seconds"] = time.time() - self.t0
            summary["config"] = dataclasses.asdict(cfg)
            with open(os.path.join(self.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary

    def _evaluate(self) -> Dict[str, float]:
        s, cfg = self.splits, self.cfg
        kw = dict(device=self.device, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
                  shots=cfg.fewshot_shots, draws=cfg.fewshot_draws, seed=cfg.seed)
        trained = evaluate_encoder(self.model.encoder, s.train, s.test, s.image_size, s.mean, s.std, **kw)
        baseline = _fresh_model(cfg, s.channels).to(self.device)
        random_init = evaluate_encoder(baseline.encoder, s.train, s.test, s.image_size, s.mean, s.std, **kw)
        out = dict(trained)
        out.update({f"random_init_{k}": v for k, v in random_init.items()})
        out["test_images"] = len(s.test)
        return out


class _Metrics:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard scalars when it is installed."""

    def __init__(self, out: str, append: bool):
        os.makedirs(out, exist_ok=True)
        self.f = open(os.path.join(out, "metrics.jsonl"), "a" if append else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except ImportError:
            self.tb = None

    def write(self, **row):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            x = row.get("step", row.get("epoch"))
            for k, v in row.items():
                if isinstance(v, float) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{row.get('kind', 'step')}/{k}", v, x)

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


def _plot_curve(history: List[dict], path: str) -> None:
    """Loss per epoch, with the kNN monitor on a second axis when it ran."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss", color="tab:blue")
    knn = [(r["epoch"], r["knn_top1"]) for r in history if "knn_top1" in r]
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "o-", color="tab:orange")
        ax2.set_ylabel("kNN top-1", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pretrain(config: Optional[PretrainConfig] = None, **overrides) -> Dict:
    """Run SimCLR pretraining (Chen et al. 2020) and return the summary (also written to
    `<out>/summary.json`): linear_top1, knn_top1, fewshot_top1 and their random_init_* baselines as
    fractions of the held-out split, plus wall_seconds. Keyword overrides replace config fields."""
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    return Trainer(config).run()


# ----- evaluating a saved run ----------------------------------------------------------------------
def load_pretrained(checkpoint: str, device: Optional[str] = None):
    """(model in eval mode, resolved PretrainConfig) from a checkpoint written by pretrain."""
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {os.path.abspath(checkpoint)!r}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint!r} is not a simclr_ext pretraining checkpoint")
    cfg = PretrainConfig(**state["config"])
    if cfg.pool is None:  # checkpoints written before these fields existed: the 2x2 grid, final ReLU
        cfg.pool = 2
    if cfg.final_relu is None:
        cfg.final_relu = True
    if device is not None:
        cfg.device = device
    elif not torch.cuda.is_available():
        cfg.device = "cpu"
    channels = 1 if cfg.dataset in ("digits", "mnist") else 3
    model = build_model(cfg.arch, channels, cfg.width, cfg.cifar_stem, cfg.head, cfg.proj_dim, cfg.hidden_dim, cfg.pool, cfg.final_relu)
    model.load_state_dict(state["model"])
    return model.to(cfg.device).eval(), cfg


def _eval_features(checkpoint, data_dir, download, device):
    model, cfg = load_pretrained(checkpoint, device)
    s = data_lib.load_dataset(cfg.dataset, data_dir or cfg.data_dir, download, cfg.image_size)
    tr = extract_features(model.encoder, s.train, s.image_size, s.mean, s.std, device=cfg.device)
    te = extract_features(model.encoder, s.test, s.image_size, s.mean, s.std, device=cfg.device)
    return tr, te, s


def linear_eval(checkpoint: str, data_dir: Optional[str] = None, download: bool = False,
                device: Optional[str] = None, weight_decay: float = 1e-4) -> Dict[str, float]:
    """Linear probe of a checkpoint's frozen encoder: {"top1", "top5"} on the test split."""
    tr, te, s = _eval_features(checkpoint, data_dir, download, device)
    return linear_probe(tr, s.train.labels, te, s.test.labels, s.num_classes, weight_decay)


def knn_eval(checkpoint: str, k: int = 200, temperature: float = 0.1, data_dir: Optional[str] = None,
             download: bool = False, device: Optional[str] = None) -> float:
    """Weighted kNN top-1 (cosine, k nearest, weights exp(sim / temperature)) of a checkpoint's encoder."""
    tr, te, s = _eval_features(checkpoint, data_dir, download, device)
    return knn_classify(tr, s.train.labels, te, s.test.labels, k, temperature, s.num_classes)
