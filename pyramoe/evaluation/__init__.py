"""Zero-shot evaluation: local tasks built from held-out text (`taskdata`), batched scoring with a
pyramoe model (`scoring`), and the lm-evaluation-harness model "pyramoe" (`lm`, which needs the `eval`
extra) run in-process by `harness`. Nothing here is imported eagerly: lm-eval stays optional."""
