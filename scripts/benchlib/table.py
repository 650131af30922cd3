"""The Markdown table (results.md, also printed): a row per figure, a column per server, pop3d's
ratio to the figure's baseline and the goal it is held to (TARGETS)."""

from __future__ import annotations

from pathlib import Path

from benchlib.results import Results
from benchlib.servers import PEERS

COLUMNS = ["pop3d", "floor", *(peer.NAME for peer in PEERS)]
LISTEN = "pop3d --listen"  # a column of the concurrency mode only (the ratio column gives both)

# metric -> (baseline server, target text, target ratio (pop3d/baseline must be <= or >=))
TARGETS = {
    "greeting p50": ("floor", "≤ 1.3x floor", 1.3, "le"),
    "USER/PASS/STAT/QUIT p50, system account (PAM)": ("popa3d", "≤ 1.25x popa3d", 1.25, "le"),
    "login+STAT": ("popa3d", "≤ 1.0x popa3d", 1.0, "le"),
    "UIDL all": ("popa3d", "≤ 2x popa3d", 2.0, "le"),
    "RETR all": ("popa3d", "≥ 1.0x popa3d", 1.0, "ge"),
    "CPU (read session)": ("popa3d", "≤ 1.5x popa3d", 1.5, "le"),
    "peak RSS": ("popa3d", "≤ 25 MB at 256 MiB", None, ""),
    "DELE last + QUIT": ("popa3d", "≤ 10 ms", None, ""),
    "DELE all + QUIT": ("popa3d", "≤ 1.0x popa3d", 1.0, "le"),
    "DELE 1 + QUIT": ("popa3d", "≤ 2.5x popa3d", 2.5, "le"),
    "DELE 1 + QUIT, disk floor": ("floor", "≤ 1.25x the disk's floor (dd)", 1.25, "le"),
    "stock poplib": ("dovecot", "≥ 1.0x Dovecot", 1.0, "ge"),
    "poll, first (no index yet)": ("popa3d", "≤ pop3d's poll, index off", None, ""),
    "poll, unchanged spool": ("popa3d", "≤ 0.35x popa3d at 256 MiB", 0.35, "le"),
    "poll after one delivery": ("popa3d", "≤ 0.35x popa3d at 256 MiB", 0.35, "le"),
    "sessions/s": ("popa3d", "inetd ≥ 0.7x, --listen ≥ 1.0x popa3d", 0.7, "ge"),
}


def _target(metric: str) -> tuple[str, str, float | None, str]:
    if "tiny messages: " in metric:  # the bound for these is absolute
        if metric.endswith(("login+STAT", "LIST all")):
            return ("popa3d", "< 1 s", None, "")
        return ("popa3d", "", None, "")
    for key, value in TARGETS.items():
        if metric == key or metric.endswith(": " + key) or metric.startswith(key):
            return value
    return ("popa3d", "", None, "")


def write_table(res: Results, out: Path) -> None:
    rows: dict[str, dict[str, dict]] = {}
    for rec in res.records:
        if rec["metric"] == "setup" or rec.get("verified") is False:
            continue
        rows.setdefault(str(rec["metric"]), {})[str(rec["server"])] = rec
    cols = list(COLUMNS)
    if any(rec["server"] == LISTEN for rec in res.records):
        cols.insert(1, LISTEN)
    lines = [
        "| figure | " + " | ".join(cols) + " | ratio | target |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for metric, by_server in rows.items():
        base_name, target_text, _, _ = _target(metric)
        cells = []
        for c in cols:
            rec = by_server.get(c)
            if rec is None:
                cells.append("")
            elif rec["value"] is None:
                cells.append("skipped")
            else:
                spread = ""
                if rec.get("n", 1) > 1 and "min" in rec and rec["value"]:
                    # half the min-max range of the rounds, relative to their median: the noise
                    spread = f" ±{(rec['max'] - rec['min']) / rec['value'] * 50:.0f}%"
                cells.append(fmt_value(rec["value"], str(rec["unit"])) + spread)
        mine = by_server.get("pop3d") or by_server.get(LISTEN)
        if mine and mine.get("baseline"):  # the phase named the row's baseline
            base_name = str(mine["baseline"])
        base = by_server.get(base_name)
        ratios = []
        for name in ("pop3d", LISTEN):
            rec = by_server.get(name)
            if rec and base and rec["value"] and base["value"]:
                prefix = "--listen " if name == LISTEN else ""
                ratios.append(f"{prefix}{rec['value'] / base['value']:.2f}x")
        ratio = f"{', '.join(ratios)} {base_name}" if ratios else ""
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {ratio} | {target_text} |")
    setup = [r for r in res.records if r["metric"] == "setup"]
    if setup:
        first, last = setup[0], setup[-1]
        lines.append("")
        lines.append(
            f"{first.get('note')}; launcher {first.get('launcher')}; {first.get('nproc')} CPUs; "
            f"load average {first.get('load', 0):.1f} at the start, {last.get('load', 0):.1f} at the end; "
            "±: half the spread of the rounds"
        )
    if res.failures:
        lines.append("")
        lines.extend(f"- VERIFY FAILED: {f}" for f in res.failures)
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    print(table, flush=True)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "MB/s":
        return f"{v:.0f} MB/s"
    if unit == "/s":
        return f"{v:.1f}/s"
    if unit == "MB":
        return f"{v:.1f} MB"
    return f"{v:.3g} {unit}"
