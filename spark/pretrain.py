"""spark-pretrain: SparK masked pretraining of a timm convnet (also `python -m spark.pretrain`).

    spark-pretrain                                   # quick run on the embedded photographs
    spark-pretrain --data /imagenet/train --model resnet50 --input-size 224 --batch-size 4096 --epochs 1600
    torchrun --nproc_per_node=8 -m spark.pretrain --data ... # one process per GPU (or CPU processes, gloo)

Writes into --out: checkpoint.pth (latest, replaced atomically), log.jsonl, loss.png (loss and lr against
the step), reconstruction.png (input / masked input / reconstruction of a fixed set of images), with
--tensorboard the same into tb/, and, at the end, encoder.pth and encoder_features.pth. Progress goes to
stderr: a start-up summary, then a progress bar on a terminal, or a plain line every --log-every steps
otherwise (log files, nohup, cluster jobs). Exit codes: 0 done, 1 runtime error (unreadable data or
checkpoint, NaN loss), 2 usage error (bad option values, missing data folder), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import distributed
from . import precision as precision_mod
from .data import (DataError, PretrainDataset, ResumableSampler, collate, default_photo_paths, find_images,
                   fixed_images, train_transform)
from .plot import LOSS_PLOT_NAME, write_loss_plot
from .model import DECODER_WIDTH
from .recipe import recipe_for
from .schedule import CLIP_GRAD_NORM, Schedule, apply_schedule, build_optimizer, default_warmup_steps, peak_lr
from .visualize import reconstruction_grid, save_png

PROG = "spark-pretrain"
PATCH = 32  # SparK's patch size: the encoder's downsample ratio
# Defaults that depend on the data: the paper's recipe for an image folder, and a quick-start preset for the
# embedded photographs (about 5 minutes on a 2-core CPU). A run this short needs a larger step than 1600 epochs
# do, and batch 16 gives it twice the updates of batch 32 for the same images.
RECIPE = {"repeats": 1, "epochs": 1600, "base_lr": 2e-4, "batch_size": 32}
QUICK_START = {"repeats": 32, "epochs": 4, "base_lr": 0.16, "batch_size": 16}
# Options that define the run: taken from the checkpoint on --resume (giving a different value is an error).
RUN_OPTIONS = ("model", "drop_path", "input_size", "batch_size", "warmup_epochs", "mask_ratio", "base_lr",
               "weight_decay", "seed", "repeats", "decoder_width")
# Values of run options that checkpoints written before the option existed were run with.
OPTIONS_BEFORE_THEY_EXISTED = {"decoder_width": DECODER_WIDTH}
# The run's length: taken from the checkpoint on --resume unless given; it may grow (to train longer), not shrink.
LENGTH_OPTIONS = ("epochs", "steps")
# Never taken from the checkpoint. Every other option (--data, --log-every, ...) is, unless given again.
NOT_RESUMED = ("resume", "out")
TENSORBOARD_DIR = "tb"


class UsageError(Exception):
    """Bad command-line values: exit code 2."""


class RunError(Exception):
    """The run cannot go on: exit code 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The option parser; with_defaults=False leaves out the defaults, to see which options were given."""
    def d(value):
        return value if with_defaults else argparse.SUPPRESS

    p = argparse.ArgumentParser(prog=PROG, description="SparK masked pretraining of a timm convnet.",
                                formatter_class=HelpFormatter,
                                argument_default=None if with_defaults else argparse.SUPPRESS)
    p.add_argument("--model", default=d("resnet18"), help="timm model name (ResNets, ConvNeXts, ...)")
    p.add_argument("--decoder-width", type=int, default=d(DECODER_WIDTH), metavar="CHANNELS",
                   help="channels of the decoder's first step, halved at each step; the paper's is the default, "
                        "a smaller one trains faster (the decoder's FLOPs grow with its width squared)")
    p.add_argument("--drop-path", type=float, default=d(None), metavar="RATE",
                   help="drop path (stochastic depth) rate of the encoder (default: the official recipe's for "
                        "the model, spark/families.py: 0.05 for resnet50 ... 0.4 for convnext_large, else 0)")
    p.add_argument("--data", default=d(None), metavar="DIR",
                   help="folder of JPEG/PNG images, class subfolders allowed; default: the embedded photographs")
    p.add_argument("--repeats", type=int, default=d(None),
                   help=f"random crops of each image per epoch (default: {RECIPE['repeats']} with --data, "
                        f"{QUICK_START['repeats']} without)")
    p.add_argument("--input-size", type=int, default=d(96), help="crop size in pixels, a multiple of 32")
    p.add_argument("--batch-size", type=int, default=d(None),
                   help=f"global batch, split across processes (default: {RECIPE['batch_size']} with --data, "
                        f"{QUICK_START['batch_size']} without)")
    p.add_argument("--epochs", type=int, default=d(None),
                   help=f"epochs to train (default: {RECIPE['epochs']} with --data, {QUICK_START['epochs']} "
                        f"without; ignored when --steps is given)")
    p.add_argument("--steps", type=int, default=d(None), help="total optimizer steps (overrides --epochs)")
    p.add_argument("--warmup-epochs", type=float, default=d(None),
                   help="linear lr warm-up length (default: 1/40 of the run, the paper's 40 of 1600 epochs)")
    p.add_argument("--mask-ratio", type=float, default=d(0.6), help="fraction of 32x32 patches masked")
    p.add_argument("--base-lr", type=float, default=d(None),
                   help=f"peak lr = base lr x batch size / 256 (default: {RECIPE['base_lr']:g} with --data, "
                        f"{QUICK_START['base_lr']:g} without)")
    p.add_argument("--weight-decay", type=float, nargs=2, default=d([0.04, 0.2]), metavar=("START", "END"),
                   help="weight decay, cosine ramp from START to END")
    p.add_argument("--workers", type=int, default=d(min(8, os.cpu_count() or 1)), help="data loader processes")
    p.add_argument("--out", default=d(os.path.join("runs", "spark-pretrain")), metavar="DIR",
                   help="output folder")
    p.add_argument("--resume", nargs="?", const="auto", default=d(None), metavar="CHECKPOINT",
                   help="continue from CHECKPOINT; without a value, from --out's checkpoint.pth")
    p.add_argument("--backend", default=d(None), help="spark_kernels backend (default: best for the device)")
    p.add_argument("--device", default=d(None), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=precision_mod.CHOICES, default=d("auto"),
                   help="fp32, or autocast to bf16 / fp16 (fp16: CUDA only, with a gradient scaler); auto: bf16 "
                        "where the hardware computes it natively (CUDA sm_80+, CPUs with AVX512-BF16 or AMX), "
                        "else fp32")
    p.add_argument("--seed", type=int, default=d(0), help="seed of weights, crops and masks")
    p.add_argument("--save-every", type=int, default=d(1), metavar="EPOCHS",
                   help="write a checkpoint and reconstruction.png every this many epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=d(10), metavar="STEPS",
                   help="interval of the log.jsonl records (and of the progress lines when stderr is not a terminal)")
    p.add_argument("--tensorboard", action="store_true", default=d(False),
                   help=f"also write the scalars and reconstructions for TensorBoard into --out's {TENSORBOARD_DIR}/ "
                        f"(needs the tensorboard package)")
    p.add_argument("--num-vis", type=int, default=d(8), help="images in reconstruction.png")
    return p


# -- option handling -------------------------------------------------------------------------------------

def fill_data_defaults(args: argparse.Namespace) -> None:
    preset = RECIPE if args.data is not None else QUICK_START
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.drop_path is None:
        args.drop_path = recipe_for(args.model).drop_path_rate


def check_options(args: argparse.Namespace, world: distributed.World) -> None:
    import timm
    import spark_kernels as sk

    def positive(name: str, value) -> None:
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")

    if not timm.is_model(args.model):
        raise UsageError(f"--model {args.model}: not a timm model name")
    if args.input_size <= 0 or args.input_size % PATCH:
        raise UsageError(f"--input-size must be a positive multiple of {PATCH}, got {args.input_size}")
    if args.decoder_width <= 0 or args.decoder_width % PATCH:  # halved once per factor 2 of the patch size
        raise UsageError(f"--decoder-width must be a positive multiple of {PATCH}, got {args.decoder_width}")
    for name in ("batch_size", "epochs", "steps", "repeats", "save_every", "log_every"):
        positive(name.replace("_", "-"), getattr(args, name))
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise UsageError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.workers < 0 or args.num_vis < 0:
        raise UsageError("--workers and --num-vis must be >= 0")
    if not 0 <= args.drop_path < 1:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if not 0 <= args.mask_ratio < 1:
        raise UsageError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.base_lr <= 0 or min(args.weight_decay) < 0:
        raise UsageError("--base-lr must be positive and --weight-decay non-negative")
    if args.backend is not None and args.backend not in sk.BACKEND_NAMES:
        raise UsageError(f"--backend {args.backend}: choose one of {', '.join(sk.BACKEND_NAMES)}")
    if args.batch_size % world.size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world.size} processes")
    if args.device is not None and args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: choose cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401 - imports the tensorboard package
        except ImportError as err:
            raise UsageError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {err}") from None


def check_backend(backend: Optional[str], device: torch.device) -> None:
    import spark_kernels as sk
    from spark_kernels._backends import get_backend
    if backend is None:
        return
    why = sk.unavailable_reasons().get(backend)
    if why:
        raise UsageError(f"--backend {backend}: unavailable here: {why}")
    if device.type not in get_backend(backend).device_types:
        raise UsageError(f"--backend {backend} runs on {'/'.join(get_backend(backend).device_types)}, "
                         f"not on the {device.type} device (see --device)")


def resume_path(args: argparse.Namespace) -> Optional[str]:
    if args.resume is None:
        return None
    path = os.path.join(args.out, ckpt_io.CHECKPOINT_NAME) if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    return path


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def merge_resumed_options(args: argparse.Namespace, given: Dict, saved: Dict, path: str) -> None:
    """Options of the checkpoint's run: run-defining ones must not change (a different value on the command
    line is an error), the length may be given anew (checked against the checkpoint's once the steps are
    known), every other option is kept unless given."""
    saved = {**OPTIONS_BEFORE_THEY_EXISTED, **saved}
    for name in RUN_OPTIONS + LENGTH_OPTIONS:
        if name not in saved:
            raise RunError(f"--resume {path}: checkpoint lacks the option {name}")
    for name in RUN_OPTIONS:
        if name in given and given[name] != saved[name]:
            raise UsageError(f"{option_flag(name)} {given[name]} conflicts with the checkpoint's {saved[name]} "
                             f"({path}); leave it out to resume")
    length_given = any(name in given for name in LENGTH_OPTIONS)
    for name, value in saved.items():
        if not hasattr(args, name) or name in NOT_RESUMED or name in given:
            continue
        if name in LENGTH_OPTIONS and length_given:
            value = None  # e.g. --epochs given on resuming a --steps run: the new length is in epochs
        setattr(args, name, value)


def run_options(args: argparse.Namespace) -> Dict:
    """The options stored in checkpoints (all but NOT_RESUMED)."""
    return {name: value for name, value in vars(args).items() if name not in NOT_RESUMED}


def length_description(args: argparse.Namespace) -> str:
    return f"--steps {args.steps}" if args.steps is not None else f"--epochs {args.epochs}"


# -- pieces of the run -----------------------------------------------------------------------------------

def build_dataset(args: argparse.Namespace) -> PretrainDataset:
    try:
        paths = find_images(args.data) if args.data is not None else default_photo_paths()
    except DataError as err:
        raise UsageError(str(err)) from None
    return PretrainDataset(paths, train_transform(args.input_size), repeats=args.repeats,
                           preload=args.data is None)


def build_model(args: argparse.Namespace, device: torch.device, world: distributed.World):
    from . import SparK
    torch.manual_seed(args.seed)
    # timm's default drop path rate is 0, and not every timm model takes the argument.
    timm_kwargs = {"drop_path_rate": args.drop_path} if args.drop_path else {}
    try:
        model = SparK(args.model, input_size=args.input_size, mask_ratio=args.mask_ratio, backend=args.backend,
                      decoder_width=args.decoder_width, **timm_kwargs)
    except TypeError as err:
        if "drop_path_rate" not in str(err):
            raise
        raise UsageError(f"--drop-path {args.drop_path}: {err}") from None
    model.to(device)
    if world.size > 1:
        distributed.synchronize_batch_norm(model)
    return model


def mask_for_step(seed: int, step: int, global_batch: int, grid: int, mask_ratio: float,
                  world: distributed.World) -> torch.Tensor:
    """This process's rows of the global batch's patch mask for `step` (a function of seed and step only,
    so it does not depend on the process count or on resuming)."""
    from spark_kernels.masks import patch_mask
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return patch_mask(global_batch, grid, mask_ratio, generator=generator)[world.rank::world.size]


class JsonLog:
    """log.jsonl; on resume, records after the checkpoint's step (from the interrupted run) are dropped."""

    def __init__(self, path: str, resume_step: Optional[int], fixed: Optional[Dict] = None):
        self.path = path
        self.fixed = dict(fixed or {})  # fields of every record (the run's precision)
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and self._step(line) <= resume_step]
            ckpt_io.atomic_write(path, lambda out: out.write("".join(kept).encode()))
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    @staticmethod
    def _step(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            return 0  # a torn last line from a killed run: keep nothing after it matters

    def write(self, record: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, **self.fixed}) + "\n")


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: the CUDA caching allocator's peak on GPUs, this process's peak RSS on CPUs."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is in KiB


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Statistics of the steps since the last record, merged over all processes at each record: mean loss,
    images/s, and the unreadable files met (warned about once, kept for the checkpoint). Rank 0 writes each
    record to log.jsonl, TensorBoard (when enabled) and the progress bar, or, when stderr is not a terminal,
    as a plain progress line."""

    def __init__(self, world: distributed.World, batch_size: int, steps_per_epoch: int, total_steps: int,
                 start_step: int, device: torch.device, skipped: List[str], log: Optional[JsonLog], bar,
                 tensorboard=None, plain_lines: bool = False):
        self.world, self.batch_size, self.steps_per_epoch = world, batch_size, steps_per_epoch
        self.total_steps, self.start_step, self.device = total_steps, start_step, device
        self.skipped, self.log, self.bar, self.tensorboard = skipped, log, bar, tensorboard
        self.plain_lines = plain_lines and world.is_main
        self.run_start = time.perf_counter()
        self.last: Dict = {}
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps, self.new_bad, self.start = 0.0, 0, [], time.perf_counter()

    def add(self, loss: float, bad: List[str]) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.new_bad.extend(bad)

    def record(self, step: int, lr: float, wd: float, grad_norm: float) -> Dict:
        mean_loss, new_bad = self.loss_sum / self.steps, self.new_bad
        if self.world.size > 1:
            total = torch.tensor([mean_loss], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            mean_loss = total.item() / self.world.size
            gathered: List[List[str]] = [[] for _ in range(self.world.size)]
            torch.distributed.all_gather_object(gathered, new_bad)
            new_bad = [p for paths in gathered for p in paths]
        for path in dict.fromkeys(new_bad):
            if path not in self.skipped:
                self.skipped.append(path)
                if self.world.is_main:
                    print(f"{PROG}: warning: skipping unreadable image {path}", file=sys.stderr)
        now = time.perf_counter()
        self.last = {"step": step, "epoch": step / self.steps_per_epoch, "loss": mean_loss, "lr": lr, "wd": wd,
                     "images_per_s": self.steps * self.batch_size / max(now - self.start, 1e-9),
                     "grad_norm": grad_norm, "skipped_images": len(self.skipped)}
        if self.log is not None:
            self.log.write(self.last)
        if self.tensorboard is not None:
            for name in ("loss", "lr", "wd", "grad_norm", "images_per_s"):
                self.tensorboard.add_scalar(name, self.last[name], step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.last['images_per_s']:.1f}")
        if self.plain_lines:
            seconds_per_step = (now - self.run_start) / max(step - self.start_step, 1)
            print(f"{PROG}: step {step}/{self.total_steps} epoch {self.last['epoch']:.2f} loss {mean_loss:.4f} "
                  f"lr {lr:.2e} images/s {self.last['images_per_s']:.1f} "
                  f"ETA {duration(seconds_per_step * (self.total_steps - step))} "
                  f"peak mem {peak_memory(self.device)}", file=sys.stderr, flush=True)
        self._reset()
        return self.last


def write_reconstructions(model, images: torch.Tensor, args: argparse.Namespace, path: str):
    """PNG of input / masked input / reconstruction for the fixed images, with a fixed mask, in eval mode
    (eval BN needs no other process, so rank 0 can do it alone)."""
    from spark_kernels.masks import patch_mask
    grid = args.input_size // PATCH
    mask = patch_mask(images.shape[0], grid, args.mask_ratio, generator=torch.Generator().manual_seed(args.seed))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inp, masked, rec = model.reconstruct(images.to(device), mask=mask.to(device))
    finally:
        model.train(was_training)
    grid = reconstruction_grid(inp, masked, rec)
    save_png(grid, path)
    return grid


def open_tensorboard(out: str, start_step: int):
    """A SummaryWriter on --out's tb/; on resume, events after the checkpoint's step are dropped (purge)."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(out, TENSORBOARD_DIR), purge_step=start_step if start_step else None)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backend_summary(model, device: torch.device, precision: str) -> str:
    """Which backend runs each kind of sparse op in `model` (and how many layers of each kind) on activations
    of the run's precision."""
    import spark_kernels as sk
    kinds = (("depthwise conv", sk.nn.SparseDepthwiseConv2d, "sparse_depthwise_conv2d"),
             ("masked batch norm", sk.nn.MaskedBatchNorm2d, "masked_batch_norm"),
             ("masked layer norm", sk.nn.MaskedLayerNorm, "masked_layer_norm"))
    probe = torch.empty(0, device=device, dtype=precision_mod.DTYPES[precision])
    parts = []
    for label, kind, op in kinds:
        layers = [m for m in model.modules() if isinstance(m, kind)]
        if not layers:
            parts.append(f"{label}: not used")
            continue
        names = sorted({sk.select_backend(m.backend, probe, op).name for m in layers})
        parts.append(f"{label}: {'/'.join(names)} ({len(layers)} layers)")
    return ", ".join(parts) + "; dense convs and the decoder: PyTorch"


def startup_summary(args: argparse.Namespace, model, device: torch.device, dataset: PretrainDataset,
                    world: distributed.World, steps_per_epoch: int, total_steps: int, schedule: Schedule,
                    start_step: int, saved: Optional[Dict], path: Optional[str], precision: str,
                    why: str) -> List[str]:
    source = f"--data {args.data}" if args.data is not None else "the embedded photographs"
    encoder = count_parameters(model.encoder)
    processes = f"{world.size} process{'es' if world.size > 1 else ''}"
    lines = [
        f"model {args.model} at {args.input_size} px: {encoder / 1e6:.1f}M encoder + "
        f"{(count_parameters(model) - encoder) / 1e6:.1f}M decoder parameters (decoder width {args.decoder_width}), "
        f"device {device}",
        f"precision {precision} ({why})",
        f"backends: {backend_summary(model, device, precision)}",
        f"data: {len(dataset.paths)} image files from {source} x {args.repeats} crops = {len(dataset)} samples per "
        f"epoch; batch {args.batch_size // world.size} per process x {processes}",
        f"{total_steps} steps ({total_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch}), peak lr "
        f"{schedule.peak_lr:.3g}, warm-up {schedule.warmup_steps} steps; outputs in {args.out}",
    ]
    if saved is not None:
        previous = int(saved["total_steps"])
        if previous != total_steps:
            lines.append(f"resuming at step {start_step} from {path}, extending the run from {previous} to "
                         f"{total_steps} steps: lr and weight decay schedules recomputed for {total_steps} steps "
                         f"(lr now {schedule.lr(start_step):.3g})")
        else:
            lines.append(f"resuming at step {start_step} of {total_steps} from {path}")
        if saved.get("precision", "fp32") != precision:
            lines.append(f"the checkpoint was trained in {saved.get('precision', 'fp32')}; resuming in {precision}")
    return [f"{PROG}: {line}" for line in lines]


# -- the run ---------------------------------------------------------------------------------------------

def train(args: argparse.Namespace, given: Dict, world: distributed.World) -> Dict:
    path = resume_path(args)
    saved = None
    if path is not None:
        try:
            saved = ckpt_io.load_checkpoint(path)
        except ckpt_io.CheckpointError as err:
            raise RunError(str(err)) from None
        merge_resumed_options(args, given, saved["args"], path)
    fill_data_defaults(args)
    check_options(args, world)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    check_backend(args.backend, device)
    try:
        precision, why = precision_mod.resolve(args.precision, device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    scaler = precision_mod.grad_scaler(precision, device)
    dataset = build_dataset(args)
    batch_per_process = args.batch_size // world.size
    sampler = ResumableSampler(dataset, world.size, world.rank, args.seed, batch_per_process)
    steps_per_epoch = sampler.steps_per_epoch()
    if steps_per_epoch == 0:
        raise UsageError(f"{len(dataset)} samples per epoch make no full batch of {args.batch_size}; "
                         f"lower --batch-size or raise --repeats")
    total_steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    warmup = (default_warmup_steps(total_steps) if args.warmup_epochs is None
              else max(1, round(args.warmup_epochs * steps_per_epoch)))
    schedule = Schedule(peak_lr(args.base_lr, args.batch_size), total_steps, warmup, *args.weight_decay)
    if saved is not None and total_steps < saved["total_steps"]:
        raise UsageError(f"{length_description(args)} gives {total_steps} steps, fewer than the {saved['total_steps']} "
                         f"of the checkpoint's run ({path}): a resumed run can be extended, not shortened")

    if world.is_main:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out {args.out}: cannot create the folder: {err.strerror}") from None
        ckpt_io.remove_stale_temporaries(args.out)

    model = build_model(args, device, world)
    optimizer = build_optimizer(model, args.model, schedule.peak_lr)
    start_step = 0
    skipped: List[str] = []
    if saved is not None:
        if saved.get("steps_per_epoch") != steps_per_epoch:
            raise RunError(f"--resume {path}: the checkpoint's run has {saved.get('steps_per_epoch')} steps per "
                           f"epoch, this data gives {steps_per_epoch}: was the data set changed?")
        try:
            ckpt_io.load_model_state(model, saved["model"], path)
            optimizer.load_state_dict(saved["optimizer"])
        except ckpt_io.CheckpointError as err:
            raise RunError(str(err)) from None
        except (ValueError, RuntimeError, KeyError) as err:
            raise RunError(f"--resume {path}: optimizer state does not fit this model: {err}") from None
        if scaler is not None and "grad_scaler" in saved:
            scaler.load_state_dict(saved["grad_scaler"])
        start_step = int(saved["step"])
        skipped = list(saved.get("skipped_files", []))
        if world.is_main:
            ckpt_io.set_rng_state(saved["rng"])
        else:
            torch.manual_seed(args.seed * 1_000_003 + world.rank * 7919 + start_step)

    train_model = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel
        distributed.align_gradient_strides(model)
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    vis_images = None
    if world.is_main and args.num_vis > 0:
        try:
            vis_images, _ = fixed_images(dataset, args.num_vis, args.input_size)
        except DataError as err:
            raise RunError(str(err)) from None
    log = JsonLog(os.path.join(args.out, "log.jsonl"), start_step if saved is not None else None,
                  {"precision": precision}) if world.is_main else None
    interactive = sys.stderr.isatty()
    if world.is_main:
        for line in startup_summary(args, model, device, dataset, world, steps_per_epoch, total_steps, schedule,
                                    start_step, saved, path, precision, why):
            print(line, file=sys.stderr, flush=True)

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_per_process, sampler=sampler,
                                         num_workers=args.workers, collate_fn=collate, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc=PROG, unit="step",
               disable=not (world.is_main and interactive), dynamic_ncols=True)
    tensorboard = open_tensorboard(args.out, start_step) if args.tensorboard and world.is_main else None
    progress = Progress(world, args.batch_size, steps_per_epoch, total_steps, start_step, device, skipped, log, bar,
                        tensorboard, plain_lines=not interactive)
    grid = args.input_size // PATCH
    step = start_step
    try:
        model.train()
        while step < total_steps:
            sampler.set_position(step // steps_per_epoch, step % steps_per_epoch)
            for images, bad in loader:
                images = images.to(device, non_blocking=True)
                mask = mask_for_step(args.seed, step, args.batch_size, grid, args.mask_ratio, world).to(device)
                lr, wd = apply_schedule(optimizer, schedule, step)
                with precision_mod.autocast(precision, device):
                    loss = train_model(images, mask=mask)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM))
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise RunError(f"the loss became {loss_value} at step {step + 1}; lower --base-lr?")
                step += 1
                progress.add(loss_value, bad)
                end_of_epoch = step % steps_per_epoch == 0
                if step % args.log_every == 0 or end_of_epoch or step == total_steps:
                    progress.record(step, lr, wd, grad_norm)
                bar.update(1)
                if (end_of_epoch and (step // steps_per_epoch) % args.save_every == 0) or step == total_steps:
                    if world.is_main:
                        save(args, model, optimizer, step, total_steps, steps_per_epoch, skipped, world, precision,
                             scaler)
                        write_figures(args, model, vis_images, step, tensorboard)
                if step == total_steps:
                    break
    finally:
        bar.close()
        if tensorboard is not None:
            tensorboard.close()
    result = {"step": step, "total_steps": total_steps, "last_record": progress.last, "skipped_images": len(skipped)}
    if world.is_main:
        result["exported"] = ckpt_io.export_encoder(model.encoder.state_dict(), args.model, args.out)
    return result


def write_figures(args: argparse.Namespace, model, vis_images: Optional[torch.Tensor], step: int,
                  tensorboard) -> None:
    """loss.png and reconstruction.png (and the reconstruction for TensorBoard), at each checkpoint."""
    write_loss_plot([args.out], os.path.join(args.out, LOSS_PLOT_NAME))
    if vis_images is None:
        return
    grid_image = write_reconstructions(model, vis_images, args, os.path.join(args.out, "reconstruction.png"))
    if tensorboard is not None:
        tensorboard.add_image("reconstruction", np.asarray(grid_image), step, dataformats="HWC")
        tensorboard.flush()


def save(args, model, optimizer, step: int, total_steps: int, steps_per_epoch: int, skipped: List[str],
         world: distributed.World, precision: str, scaler) -> None:
    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": model.state_dict(),
             "architecture": ckpt_io.ARCHITECTURE,
             "optimizer": optimizer.state_dict(), "step": step, "epoch": step // steps_per_epoch,
             "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "args": run_options(args),
             "rng": ckpt_io.rng_state(), "world_size": world.size, "skipped_files": list(skipped),
             "precision": precision}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    ckpt_io.atomic_torch_save(state, os.path.join(args.out, ckpt_io.CHECKPOINT_NAME))


def one_line(err: BaseException) -> str:
    """The last line of an error's message: DataLoader workers re-raise with the worker's traceback in it."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser(with_defaults=False).parse_args(argv))
    world = distributed.World()
    try:
        world = distributed.init_from_env()
        result = train(args, given, world)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except (RunError, DataError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if world.is_main:
        last = result["last_record"]
        summary = f"{PROG}: done, {result['step']}/{result['total_steps']} steps"
        if last:
            summary += f", loss {last['loss']:.4f}"
        if result["skipped_images"]:
            summary += f", {result['skipped_images']} unreadable images skipped"
        print(f"{summary}; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
