"""Collect the committed result files into one Markdown table: every ratio with its target, and the
before/after figures of the performance fixes (`bench/results/before/` holds the runs on the code
before them).

    python -m bench.summary            # writes bench/results/SUMMARY.md and prints it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS_DIR

ORDER = ("weight_sync", "data_plane", "learner_overhead", "rollout", "loop")


def load(directory: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json")) if path.stem in ORDER}


def target_text(ratio: dict) -> str:
    if ratio["target"] is None:
        return ""
    return ("≥ " if ratio["higher_is_better"] else "≤ ") + f"{ratio['target']:g}"


def summary(after: dict[str, dict], before: dict[str, dict]) -> str:
    lines = ["# Benchmark results", ""]
    for name in ORDER:
        if name not in after:
            continue
        result = after[name]
        machine = result["machine"]
        lines += [
            f"## {name}",
            "",
            f"`{result['command']}` — {result['date']}, commit {str(result['git']['commit'])[:10]}"
            f"{' (+ uncommitted changes)' if result['git']['dirty'] else ''}, {machine['cpu_model']}, "
            f"{machine['cores']} cores, {machine['ram_gib']} GiB, load average at start "
            f"{machine.get('load_average_at_start')} and at end {machine.get('load_average_at_end')}",
            "",
            "| ratio | before fixes | now | target | met |",
            "|---|---:|---:|---|---|",
        ]
        old = {r["name"]: r for r in before.get(name, {}).get("ratios", [])}
        for ratio in result["ratios"]:
            previous = old.get(ratio["name"])
            met = {None: "", True: "yes", False: "**no**"}[ratio["met"]]
            was = f"{previous['value']:.3f}" if previous else ""
            lines.append(f"| {ratio['name']} | {was} | {ratio['value']:.3f} | {target_text(ratio)} | {met} |")
        lines += ["", "| measurement | before: median | now: median | now: GB/s |", "|---|---:|---:|---:|"]
        old_timings = {t["name"]: t for t in before.get(name, {}).get("timings", [])}
        for timing in result["timings"]:
            previous = old_timings.get(timing["name"])
            was = f"{previous['median_s'] * 1e3:.1f} ms" if previous else ""
            rate = f"{timing['gb_per_s']:.2f}" if timing.get("gb_per_s") else ""
            lines.append(f"| {timing['name']} | {was} | {timing['median_s'] * 1e3:.1f} ms | {rate} |")
        cpu_rows = [
            (t["name"], t["cpu_s_per_publication"]) for t in result["timings"] if t.get("cpu_s_per_publication")
        ]
        old_cpu = {t["name"]: t.get("cpu_s_per_publication") for t in before.get(name, {}).get("timings", [])}
        if cpu_rows:
            lines += ["", "| CPU seconds per publication | before: sender + receiver | now: sender + receiver |"]
            lines.append("|---|---:|---:|")
            for timing_name, cpu in cpu_rows:
                was = old_cpu.get(timing_name)
                was_text = f"{was['sender_s']:.2f} + {was['receiver_s']:.2f}" if was else ""
                lines.append(f"| {timing_name} | {was_text} | {cpu['sender_s']:.2f} + {cpu['receiver_s']:.2f} |")
        if "modes" in result:
            lines += ["", "| mode | before: steps/min | now: steps/min | before: learner idle | now: learner idle |"]
            lines.append("|---|---:|---:|---:|---:|")
            for mode, figures in result["modes"].items():
                was = before.get(name, {}).get("modes", {}).get(mode)
                lines.append(
                    f"| {mode} | {was['steps_per_min']:.0f} | {figures['steps_per_min']:.0f} | "
                    f"{was['learner_idle_fraction']:.0%} | {figures['learner_idle_fraction']:.0%} |"
                    if was
                    else f"| {mode} | | {figures['steps_per_min']:.0f} | | {figures['learner_idle_fraction']:.0%} |"
                )
        for note in result.get("notes", []):
            lines.append(f"\nNote: {note}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "SUMMARY.md")
    args = parser.parse_args()
    text = summary(load(args.results), load(args.results / "before"))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
