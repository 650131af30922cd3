"""The optional PNG chart (--chart): login+STAT and RETR throughput against spool size, per server.

Needs matplotlib (`pip install 'pop3d[bench]'`), imported only here; without it the run says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchlib.results import Results


def draw_chart(res: Results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# no chart: matplotlib is not installed (pip install 'pop3d[bench]')", flush=True)
        return
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rec in res.records:
        m = re.match(r"([\d.]+) MiB: (login\+STAT|RETR all)$", str(rec["metric"]))
        if m and rec["value"] and float(m.group(1)) > 0:  # a log axis has no place for an empty spool
            series.setdefault((m.group(2), str(rec["server"])), []).append((float(m.group(1)), rec["value"]))
    if not series:
        print("# no chart: no spool-size figures", flush=True)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for (metric, server), points in sorted(series.items()):
        points.sort()
        ax = a if metric == "login+STAT" else b
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=server)
    a.set(
        title="login+STAT (Dovecot: index built)",
        xlabel="spool MiB",
        ylabel="seconds",
        xscale="log",
        yscale="log",
    )
    b.set(title="RETR all (one client)", xlabel="spool MiB", ylabel="MB/s", xscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"# chart: {path}", flush=True)
