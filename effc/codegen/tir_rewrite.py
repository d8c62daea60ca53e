"""One way to turn a TIR statement rewrite into a module pass, shared by effc's marker-driven lowerings
(a schedule rule annotates a loop or block; a pass after scheduling rewrites what it marked)."""

from __future__ import annotations


def marked_stmt_pass(name: str, key: str, rewrite):
    """A module pass that maps ``rewrite`` over every node of each PrimFunc whose text holds ``key``
    (the rule's annotation: functions without it are left untouched and unprinted past the check)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and key in func.script(show_meta=False):
                mod[gv] = func.with_body(tvm_ffi.structural_map(func.body, rewrite))
        return mod

    return _pass
