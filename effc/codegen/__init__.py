"""effc codegen: Relax import, per-target schedule rules, build and run of compiled modules."""
