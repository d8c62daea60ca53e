"""One way to turn a TIR statement rewrite into a module pass, shared by effc's marker-driven lowerings
(a schedule rule annotates a loop or block; a pass after scheduling rewrites what it marked)."""

from __future__ import annotations


def marked_stmt_pass(name: str, key: str | None, rewrite):
    """A module pass that maps ``rewrite`` over every node of each PrimFunc whose text holds ``key``
    (the rule's annotation: functions without it are left untouched and unprinted past the check);
    ``key`` None: every PrimFunc. A function the rewrite leaves as it was is not replaced."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and (key is None or key in func.script(show_meta=False)):
                body = tvm_ffi.structural_map(func.body, rewrite)
                if not body.same_as(func.body):
                    mod[gv] = func.with_body(body)
        return mod

    return _pass
