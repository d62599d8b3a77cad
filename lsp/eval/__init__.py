"""The language server's evaluation: HumanEval-Infilling through its completion path, in a sandbox."""
