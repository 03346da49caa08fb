"""conform's report: the summary, the terminal table and the JSON document.

A case's status is pass, warn (a near tie), fail, known (it failed only in ways the
claimed backend is documented to, `backends.Backend.known`; the exit code stays 0),
info (reported, not scored) or skip. Every case in the JSON report carries the request
bodies it sent and the raw responses (``exchanges``).
"""

from __future__ import annotations

import math
from typing import TextIO


def summarize(results: list[dict]) -> dict:
    counts = {k: 0 for k in ("pass", "warn", "fail", "known", "skip", "info")}
    faults: dict[str, list[str]] = {}
    known: dict[str, list[str]] = {}
    for r in results:
        if r["status"] == "skip":
            counts["skip"] += 1
        elif not r["scored"]:
            counts["info"] += 1
        else:
            counts[r["status"]] += 1
        if r["scored"]:
            for f in r["faults"]:
                (known if r["status"] == "known" else faults).setdefault(f, []).append(r["name"])
    return {**counts, "faults": faults, "known_faults": known, "exit_code": 1 if counts["fail"] else 0}


def _cell(r: dict) -> tuple[str, str, str]:
    if r["kind"] == "generate" and r.get("stats"):
        t = r["stats"]
        return f"N {t['n']}", f"G {t['g']:.1f} df {t['df']} p {t['pvalue']:.3g} ({t['profile']})", ""
    if r["kind"] == "generate":
        match = f"{r['match']}/{r['steps']}" if r.get("match") is not None else ""
        d = r.get("divergence")
        div = ""
        if d:
            g = d["got"]
            got = "end" if g.get("end") and g.get("id") is None else f"{g.get('id', '?')} {g.get('text')!r}"
            div = f"step {d['step']}: {d['expected']['id']} {d['expected']['text']!r} vs {got}, " \
                  f"margin {d['margin']:.3g}{'u' if d['margin_kind'] == 'u' else ''}"
        u = r.get("usage") or {}
        usage = {True: "ok", False: "DIFF", None: "n/a"}[u.get("equal")] if u else ""
        return match, div, usage
    if r["kind"] == "embed":
        c = r.get("cosine_min")
        u = r.get("usage") or {}
        usage = {True: "ok", False: "DIFF", None: "n/a"}[u.get("equal")] if u else ""
        return (f"cos {c:.7f}" if c is not None else ""), "", usage
    e = r.get("error") or {}
    return (f"HTTP {e.get('status')}" if e else ""), (e.get("variant") or ""), ""


def print_table(results: list[dict], summary: dict, out: TextIO) -> None:
    rows = [("case", "kind", "result", "match", "first divergence / detail", "usage", "faults")]
    for r in results:
        status = r["status"] if r["scored"] or r["status"] == "skip" else f"info:{r['status']}"
        match, div, usage = _cell(r)
        if r["status"] == "skip":
            div = r["notes"][0] if r["notes"] else ""
        rows.append((r["name"], r["kind"], status.upper() if status == "fail" else status, match, div, usage,
                     ",".join(r["faults"])))
    widths = [min(max(len(row[i]) for row in rows), 60) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(c[:60].ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    for r in results:
        if r["faults"] or (r["status"] == "warn"):
            for note in r["notes"]:
                print(f"  {r['name']}: {note}", file=out)
            for cause in r.get("known", []):
                print(f"  {r['name']}: known behaviour of the backend: {cause}", file=out)
    print(f"\n{summary['pass']} passed, {summary['warn']} passed with a near tie, {summary['fail']} failed, "
          f"{summary['known']} failed as the backend is known to, {summary['info']} reported only, "
          f"{summary['skip']} skipped", file=out)
    for f, names in summary["faults"].items():
        print(f"fault {f}: {', '.join(names)}", file=out)
    for f, names in summary.get("known_faults", {}).items():
        print(f"known {f}: {', '.join(names)}", file=out)
    print(f"exit {summary['exit_code']}", file=out)


def _jsonable(x):
    """Non-finite floats as strings ("NaN", "Infinity"), so the report is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
