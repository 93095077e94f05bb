"""Kernel tests run the Triton kernels in the interpreter on CPU; it must be switched on before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"


def assert_broken_install_warns_once(monkeypatch, caplog, loader, package: str, logger: str) -> None:
    """An installed ``package`` whose import fails makes the cached ``loader`` return None and log one warning that
    names the failure (the optional GPU packages: FA4, quack)."""
    import builtins
    import importlib.util

    real_import, real_find = builtins.__import__, importlib.util.find_spec

    def broken(name, *args, **kwargs):
        if name.startswith(package.split(".")[0]):
            raise OSError("libcute_dsl_runtime.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    loader.cache_clear()
    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == package else real_find(name, *a))
    try:
        with caplog.at_level("WARNING", logger=logger):
            assert loader() is None and loader() is None
    finally:
        loader.cache_clear()
    warned = [r.getMessage() for r in caplog.records if "does not import" in r.getMessage()]
    assert len(warned) == 1 and "libcute_dsl_runtime.so" in warned[0]


def assert_matches_reference(fn, args, leaves, dy, y_ref, compiled: bool) -> None:
    """``fn(*args)`` (under torch.compile's aot_eager when ``compiled``) equals ``y_ref`` and gives the same gradients
    of ``leaves`` for the output gradient ``dy``, to 1e-5."""
    import torch

    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    run = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
    y = run(*args)
    grads = torch.autograd.grad(y, leaves, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"gradient of input {i}: {m}")
