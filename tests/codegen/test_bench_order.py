"""effc.codegen.bench.turns: the engines' order changes from round to round (every engine follows a
mix of the others, so none always pays for the same predecessor), reproducibly; every engine is
still timed once after idle and ``burst`` times back to back per timed round."""

from __future__ import annotations

from collections import defaultdict


def test_every_engine_follows_several_others():
    from effc.codegen.bench import round_order

    names = ["effc", "ort", "openvino-f32", "openvino"]
    predecessors = defaultdict(set)
    for r in range(8):
        order = round_order(names, r)
        assert sorted(order) == sorted(names) and order == round_order(names, r)  # a permutation, reproducible
        for before, after in zip(order, order[1:]):
            predecessors[after].add(before)
    assert all(len(predecessors[n]) >= 2 for n in names), dict(predecessors)


def test_turns_time_every_engine_in_every_round_in_changing_order():
    from effc.codegen.bench import turns

    calls = []
    engines = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    steady, idle = turns(engines, rounds=6, warmup=2, settle_s=0, burst=2)
    assert all(len(steady[n]) == 4 * 2 and len(idle[n]) == 4 for n in engines)
    firsts = {calls[i * 9] for i in range(6)}  # 3 engines x (1 + 2) calls per round
    assert len(firsts) >= 2, calls  # not always the same engine first
