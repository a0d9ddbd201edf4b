"""BENCHMARKS.md sections for the classify pipeline: preprocessing, the hostile strip, admission, fairness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.common import conditions as _conditions
from bench.common import verdict as _verdict


def preprocess_section(doc: dict[str, Any]) -> list[str]:
    out = ["## Preprocessing: crop-box resampling and JPEG `draft` vs open_clip's transform", "", _conditions(doc), ""]
    out += [
        "Reference: open_clip's eval transform on the full-resolution decode. Pixel errors in normalised units "
        "(one grey level ~0.015); cosine between embeddings of the variant and the reference (random towers: "
        "compare with the cosine between *different* photos, given per row).",
        "",
        "| model | photos | variant | ms / image | max abs | mean abs | PSNR dB | min cosine | different photos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, res in doc["models"].items():
        for set_name in ("as_shipped", "upscaled_3x"):
            s = res[set_name]
            for name, r in s["variants"].items():
                out.append(
                    f"| {arch} ({res['input_size']} px) | {set_name} ({s['n_photos']}) | {name} | "
                    f"{r['ms_per_image']:.1f} | {r['max_abs']:.3f} | {r['mean_abs']:.4f} | {r['psnr_db']:.1f} | "
                    f"{r['min_cosine']:.6f} | {s['cosine_between_different_photos_median']:.4f} |"
                )
    return [*out, ""]


def hostile_section(doc: dict[str, Any]) -> list[str]:
    out = [f"## The aspect-ratio amplifier: {doc['input']}", "", _conditions(doc), ""]
    out += ["| bundle | settings | status | seconds | peak RSS growth MiB | goal |", "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        ok = r["seconds"] < 1.0 and r["peak_rss_growth_mib"] < 100
        out.append(
            f"| {r['bundle']} | {r['settings']} | {r['status']} | {r['seconds']:.3f} | "
            f"{r['peak_rss_growth_mib']:.1f} | {_verdict(ok)} |"
        )
    return [*out, "", "Before the pipeline redesign: +3.7 GB and 12-60 s on the tiny bundle (issue 10).", ""]


def admission_section(doc: dict[str, Any]) -> list[str]:
    out = ["## Admission before work: 64 closed-loop clients vs 4", "", _conditions(doc), "", doc["model"], ""]
    out += [
        "| clients | answered | goodput req/s | admitted p50 ms | p99 ms | refused | with Retry-After | "
        "refusal p50 ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in doc["levels"]:
        rp = f"{lv['refusal_p50_ms']:.1f}" if lv["refusal_p50_ms"] is not None else "-"
        out.append(
            f"| {lv['clients']} | {lv['answered']} | {lv['goodput_rps']:.2f} | {lv['admitted_p50_ms']:.0f} | "
            f"{lv['admitted_p99_ms']:.0f} | {lv['refused']} | {lv['refused_with_retry_after']} | {rp} | "
            f"{lv['server_peak_rss_mib']:.0f} |"
        )
    p50, good = doc["p50_ratio_64_vs_4"], doc["goodput_ratio_64_vs_4"]
    out += [
        "",
        f"- admitted p50 at 64 / at 4: **{p50:.2f}x** (goal <= 3x: {_verdict(p50 <= 3)}); goodput 64 / 4: "
        f"**{good:.2f}x** (goal >= 0.9x: {_verdict(good >= 0.9)}). Start-up estimate: {doc['capacity_at_start']}",
        "",
    ]
    return out


def fairness_section(doc: dict[str, Any]) -> list[str]:
    r = doc["ratio"]
    return [
        "## Fair text encoding: a class add during an open-vocabulary flood",
        "",
        _conditions(doc),
        "",
        f"{doc['model']}; flood: {doc['flood']}; flood answers {doc['flood_requests']}, median "
        f"{doc['flood_request_median_ms']:.0f} ms.",
        "",
        f"- add one class: quiet median **{doc['quiet_add_median_ms']:.0f} ms**, during the flood "
        f"**{doc['flood_add_median_ms']:.0f} ms** = {r:.2f}x (goal <= 2x: {_verdict(r <= 2)}). "
        f"Samples: quiet {[round(x) for x in doc['quiet_add_ms']]}, flood {[round(x) for x in doc['flood_add_ms']]}.",
        "",
    ]


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "preprocess": preprocess_section,
    "hostile": hostile_section,
    "admission": admission_section,
    "fairness": fairness_section,
}
