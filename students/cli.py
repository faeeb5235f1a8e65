"""``students``: train and evaluate a student from a label dataset URL.

students validate CONFIG [key=value ...]   check a training config (no model loaded)
students train CONFIG [key=value ...]      train (resumes from output_dir/checkpoint)
students eval CONFIG [key=value ...]       evaluate the model the config points at
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="students",
        description="Train a small student by KD from teacher labels streamed from a shard URL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("validate", "check a training config without loading anything"),
        ("train", "train a student (re-run to resume from the last checkpoint)"),
        ("eval", "evaluate the configured model on the held-out labels"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="student config YAML")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    return parser


def main(argv: list[str] | None = None) -> int:
    from labelgen.contract.configs import ConfigError, parse_cli_args
    from labelgen.contract.format import FormatError
    from students.config import load_train_config

    args = parse_cli_args(build_parser(), argv)  # overrides may also follow flags
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.command == "validate":
            print(f"{args.config}: OK ({cfg.data.url} → {cfg.train.output_dir})")
            return 0
        try:
            from students.trainer import Trainer
        except ImportError as exc:
            print(
                f"students: the trainer needs torch and transformers: "
                f"`pip install 'labelgen[student]'` ({exc})",
                file=sys.stderr,
            )
            return 2
        trainer = Trainer(cfg, log=lambda msg: print(msg, flush=True))
        trainer.setup()
        if args.command == "train":
            trainer.train()
            print(f"saved the student to {trainer.out / 'final'}")
        else:
            trainer.evaluate()
        return 0
    except (ConfigError, FormatError, FileNotFoundError, ValueError) as exc:
        print(f"students {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
