"""One way to turn a Relax expression mutator into a module pass, shared by effc's graph rewrites."""

from __future__ import annotations


def mutator_pass(mutator_cls, name: str):
    """A module pass that runs ``mutator_cls`` over every Relax function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        mutator = mutator_cls(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return _pass
