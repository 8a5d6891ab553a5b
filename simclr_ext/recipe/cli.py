"""The `simclr-ext` command line: pretrain, linear-eval, knn, export, info.

Errors a user can fix (a missing dataset or package, a damaged checkpoint, a bad setting) print one line
naming what is wrong and exit with status 2; a NaN loss exits 1; Ctrl-C 130."""
import argparse
import dataclasses
import json
import sys
import typing


def _info(args):
    from ..info import info

    print(json.dumps(info(), indent=2))
    return 0


# ----- pretrain --------------------------------------------------------------------------------
_HELP = {
    "recipe": "the recipe filling unset fields (default: the dataset's; imagefolder: imagenet, or imagenet_small "
              "for one or two GPUs; see simclr_ext.recipe.recipes.RECIPES)",
    "dataset": "digits (embedded, no download), mnist, cifar10, cifar100, stl10 or imagefolder",
    "data_dir": "folder holding the dataset (torchvision datasets: default ./data)",
    "download": "download a torchvision dataset into --data-dir",
    "image_size": "side of the model input (default: the dataset's)",
    "augment": "SimCLRAugment preset: digits, mnist, cifar10, stl10 or imagenet (default: the dataset's, "
               "with its recipe's overrides)",
    "pool": "small CNN: side of the pooled output grid (1: global average pooling)",
    "final_relu": "small CNN: ReLU after the last conv-BN (false: centred features, better for kNN; "
                  "default: the dataset's recipe)",
    "arch": "small_cnn, resnet18, resnet34 or resnet50",
    "width": "channels of the small CNN's first stage",
    "batch_size": "global batch (split across ranks under torchrun)",
    "optimizer": "lars, sgd or adamw",
    "temperature": "NT-Xent temperature",
    "cifar_stem": "3x3 stride-1 conv1 without max-pool (default: on up to 64 px)",
    "head": "projection head: simclr (2 layers) or simclrv2 (3 layers)",
    "lr": "base learning rate, scaled by --lr-scaling from the batch size",
    "lr_scaling": "linear (lr * B / 256), sqrt (lr * sqrt(B)) or none",
    "warmup_epochs": "linear warmup length in epochs, then cosine decay",
    "precision": "fp32, bf16 (autocast) or fp16 (CUDA, with a grad scaler)",
    "accum_steps": "micro-batches per optimizer step (negatives come from each micro-batch)",
    "grad_cache_chunk": "gradient caching: encode each micro-batch K images at a time (activations of K images, "
                        "negatives from the whole batch, one more forward; BatchNorm statistics per chunk)",
    "out": "run directory: last.pt, metrics.jsonl, training_curve.png, summary.json",
    "resume": "continue from <out>/last.pt exactly where it stopped (--lr, --temperature, --precision and "
              "--grad-cache-chunk may change: logged as a departure)",
    "overwrite": "start over in a run directory that already holds a checkpoint (deletes its outputs)",
    "device": "cpu, cuda or cuda:N (default: cuda when available)",
    "knn_every": "kNN monitor every N epochs (0: off)",
    "threads": "torch CPU threads during the run (digits/MNIST recipe: 1, fastest for its small tensors)",
    "eval": "evaluation at the end (linear probe, kNN, few-label probe, random-init baselines)",
    "fewshot_shots": "labelled images per class of the few-label probe",
    "max_nonfinite_steps": "a step whose loss or gradients are NaN/inf is skipped (no optimizer step); the run "
                           "stops after this many consecutive ones",
}


def _add_config_arguments(parser):
    from .recipes import PretrainConfig

    hints = typing.get_type_hints(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = _HELP.get(f.name, "")
        if kind is bool and f.default is False:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif kind is bool and f.default is True:
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=f"turn off: {help_text}" if help_text else "turn off")
        elif kind is bool:  # tri-state: None means "decide from the dataset"
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="{true,false}", help=help_text)
        else:
            from .recipes import RECIPES

            recipe_fields = set().union(*RECIPES.values())
            shown = "the dataset's recipe" if f.name in recipe_fields else f.default
            suffix = "" if shown is None else f" (default: {shown})"
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text}{suffix}".strip())


def _parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _pct(x):
    return f"{100 * x:6.2f}%"


def format_summary(summary, out):
    """The lines `make demo` shows: each accuracy next to the random-init baseline."""
    lines = [f"SimCLR on {summary['dataset']} ({summary['arch']}, {summary['epochs']} epochs): "
             f"final loss {summary['final_loss']:.4f}, {summary['wall_seconds']:.1f} s end to end"]
    if "linear_top1" in summary:
        cfg = summary.get("config", {})
        lines.append(f"held-out split ({summary['test_images']} images)   SimCLR   random init")
        rows = [("linear probe top-1", "linear_top1"),
                (f"kNN top-1 (k={cfg.get('knn_k', 200)})", "knn_top1"),
                (f"{cfg.get('fewshot_shots', 5)}-per-class probe top-1", "fewshot_top1")]
        for label, key in rows:
            lines.append(f"{label:<32}{_pct(summary[key])}   {_pct(summary['random_init_' + key])}")
    if "validation_linear_top1" in summary:
        lines.append(f"validation split ({summary['validation_images']} images): linear "
                     f"{_pct(summary['validation_linear_top1']).strip()}, "
                     f"kNN {_pct(summary['validation_knn_top1']).strip()}, "
                     f"few-label {_pct(summary['validation_fewshot_top1']).strip()} (what settings are tuned on)")
    lines.append(f"summary: {out}/summary.json")
    return "\n".join(lines)


def _pretrain(args):
    from .train import PretrainConfig, pretrain

    names = [f.name for f in dataclasses.fields(PretrainConfig)]
    config = PretrainConfig(**{n: getattr(args, n) for n in names})
    summary = pretrain(config)
    if "wall_seconds" in summary:  # rank 0 writes and reports
        print(format_summary(summary, config.out))
    return 0


def _linear_eval(args):
    from .train import linear_eval

    r = linear_eval(args.checkpoint, args.data_dir, args.download, args.device)
    print(f"linear probe: top-1 {_pct(r['top1']).strip()}, top-5 {_pct(r['top5']).strip()}")
    return 0


def _knn(args):
    from .train import knn_eval

    acc = knn_eval(args.checkpoint, args.k, args.temperature, args.data_dir, args.download, args.device)
    print(f"kNN (k={args.k}, T={args.temperature}): top-1 {_pct(acc).strip()}")
    return 0


def _export(args):
    from .checkpoint import export_encoder

    settings = export_encoder(args.checkpoint, args.out)
    print(f"encoder ({settings['arch']}, {settings['feature_dim']}-d features, {settings['image_size']} px "
          f"{settings['dataset']} input) written to {args.out}; load with simclr_ext.recipe.checkpoint.load_encoder")
    return 0


def _add_eval_arguments(p):
    p.add_argument("--checkpoint", required=True, help="a last.pt written by pretrain")
    p.add_argument("--data-dir", default=None, help="override the dataset folder stored in the checkpoint")
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default=None)


def build_parser():
    parser = argparse.ArgumentParser(prog="simclr-ext", description="Fused SimCLR training tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print the build and runtime configuration as JSON")
    p_info.set_defaults(func=_info)
    p_pre = sub.add_parser("pretrain", help="SimCLR pretraining, then evaluation against a random-init encoder",
                           description="SimCLR pretraining. Settings left out come from the dataset's recipe "
                                       "(simclr_ext.recipe.recipes.RECIPES, each number cited); with no arguments: "
                                       "the embedded digits demo.")
    _add_config_arguments(p_pre)
    p_pre.set_defaults(func=_pretrain)
    p_lin = sub.add_parser("linear-eval", help="linear probe (top-1/top-5) of a checkpoint's frozen encoder")
    _add_eval_arguments(p_lin)
    p_lin.set_defaults(func=_linear_eval)
    p_knn = sub.add_parser("knn", help="weighted kNN top-1 of a checkpoint's frozen encoder")
    _add_eval_arguments(p_knn)
    p_knn.add_argument("--k", type=int, default=200)
    p_knn.add_argument("--temperature", type=float, default=0.1)
    p_knn.set_defaults(func=_knn)
    p_exp = sub.add_parser("export",
                           help="write a checkpoint's encoder alone (state dict + the settings that rebuild it)")
    p_exp.add_argument("--checkpoint", required=True, help="a last.pt written by pretrain")
    p_exp.add_argument("--out", required=True, help="the file to write (e.g. encoder.pt)")
    p_exp.set_defaults(func=_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .data import DataNotFoundError
    from .train import NonFiniteLossError

    try:
        return args.func(args)
    except (DataNotFoundError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"simclr-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"simclr-ext {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"simclr-ext {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
