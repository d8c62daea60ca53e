"""Hand-written TVM kernels for effc ops (standalone: built and called directly, not via codegen)."""
