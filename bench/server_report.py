"""BENCHMARKS.md section for bench/server.py (rendered by ``python -m bench report``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def server_section(doc: dict[str, Any], conditions: Callable[[dict[str, Any]], str]) -> list[str]:
    if not all(k in doc for k in ("slow_clients", "sigterm", "workers")):
        return ["## HTTP layer", "", "_Incomplete result: run `python -m bench server`._", ""]
    slow, term, workers = doc["slow_clients"], doc["sigterm"], doc["workers"]
    alone, during = slow["normal_alone"], slow["normal_during"]
    out = ["## HTTP layer: slow clients, SIGTERM, supervised workers (`python -m bench server`)", ""]
    out += [conditions(doc), ""]
    out += [
        f"**Slow clients** ({slow['connections']} connections, half slowloris, half slow body, one byte per "
        f"0.3 s; {slow['deadline_s']:g} s header/body deadlines; 1-min load {slow['load_1min_at_attack']} at the "
        f"attack): {slow['closed']}/{slow['connections']} closed by the server (the 408 itself is asserted in "
        f"tests/reliability/test_slow_clients.py), the last {slow['late_max_s']} s after "
        f"its deadline (median {slow['late_median_s']} s); goal all within 1 s: "
        f"{'met' if slow['all_within_1s'] else '**not met**'}. Normal clients (readyz + classify in a loop) "
        f"alone: p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms, {alone['errors']} errors; during the "
        f"attack: p50 {during.get('p50_ms')} ms, p99 {during.get('p99_ms')} ms, {during.get('errors')} errors.",
        "",
        "**SIGTERM** (per round: 40 kept-alive connections send their next request and 120 fresh connections "
        "one classify each; the signal goes out once 60 fresh ones are sent):",
        "",
        "| server | rounds | answered 200 | answered 429/503 | refused at connect | reset "
        "| other answers | closed without answer | 1-min load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in term.items():
        other = {k.split()[-1]: v for k, v in r.items() if k.startswith("answered ")} or "-"
        out.append(
            f"| {kind} | {r['rounds']} | {r['answered']} | {r['refused with 429/503']} | {r['refused']} "
            f"| {r['reset']} | {other} | {r['no answer']} "
            f"| {', '.join(str(x) for x in r['load_1min'])} |"
        )
    starts = workers["starts"]
    out += [
        "",
        f"**`serve --workers {workers['workers']}`**, {len(starts)} starts under a CPU burner (1-min load "
        f"{workers['min_load_1min']}-{max(s['load_1min'] for s in starts)} at the starts): worker restarts and "
        f"timeout kills {workers['restarts_total']} in total (goal 0); time to all workers ready "
        f"{min(s['ready_s'] for s in starts)}-{max(s['ready_s'] for s in starts)} s. After `kill -9` of the "
        f"supervisor: {workers['orphans_total']} orphans, every worker gone within "
        f"{workers['workers_gone_max_s']} s (goal < 2 s).",
        "",
    ]
    return out
