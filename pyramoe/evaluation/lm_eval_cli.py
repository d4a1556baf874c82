"""`python -m pyramoe.evaluation.lm_eval_cli ARGS`: the `lm_eval` command line, with the model "pyramoe"
registered and the local tasks' directory as --include_path (unless ARGS give one).

lm-eval 0.4 finds models only in its registry and scans no plugin entry points, so a bare
`lm_eval --model pyramoe` cannot see this package; this wrapper imports it first. Example:

    python -m pyramoe.evaluation.lm_eval_cli --model pyramoe --model_args checkpoint=runs/tiny-moe \\
        --tasks pyramoe_stdlib --limit 100 --batch_size 16
"""

from __future__ import annotations

import sys

from pyramoe.evaluation.harness import TASKS_DIR


def lm_eval_argv(argv: list[str]) -> list[str]:
    """ARGS with --include_path TASKS_DIR added when absent."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return list(argv)
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import pyramoe.evaluation.lm  # noqa: F401 - registers the model "pyramoe"

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["lm_eval", *lm_eval_argv(argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
