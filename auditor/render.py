"""An audit report for people: one self-contained HTML page, or Markdown, from a signed report.

The page says the verdict in plain words and what alpha and beta mean for it (and what that
guarantee assumes), the queries used of the budget, the evidence against the queries (the test's
statistic with its two thresholds, and the agreement with its 95% band beside p0 and p1), the
fingerprint's digest, signature and commitment, the suspect's identity, the tool version, and the
result of verifying the report — the same checks as `deepcore verify-report`, run again here.

Nothing is fetched: the plot is inline SVG drawn here (no plotting library on the core install),
styles are inline, and every value from the report is escaped (a suspect's URL or a model name is
somebody else's text). The report's own content is never changed; the page is derived from it.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deepcore_auditor.fingerprints.stats import clopper_pearson_lower, clopper_pearson_upper, hoeffding_lower, hoeffding_upper

FORMATS = ("html", "md")

_MEANING = {
    "piracy": ("The suspect is judged a PIRATED copy of the owner's model.",
               "If the suspect were an independent model — one whose agreement with the owner on the core points is at most "
               "p0 = {p0}, the bound calibrated on independently trained reference models — a test like this one would call "
               "it a pirate with probability at most alpha = {alpha}."),
    "independent": ("The suspect is judged INDEPENDENT of the owner's model.",
                    "If the suspect were a pirate — one that keeps the owner's decisions on the core points at least as often as "
                    "p1 = {p1} (the betting test's: p0 plus a fixed margin; Wald's: calibrated on simulated pirates) — a test like "
                    "this one would clear it with probability "
                    "at most beta = {beta}."),
    "inconclusive": ("No decision: the evidence did not reach either threshold within the budget or the points.",
                     "Neither claim is made. Auditing again with a larger budget (or a fingerprint with more points) can decide."),
}
_ASSUMES = ("What the guarantee assumes: the suspect, were it independent, agrees with the owner on these points on average "
            "no more than the fingerprint's p0, an upper bound read off held-out reference models (a model unlike every "
            "reference may exceed it: the assumption a challenger tests with `deepcore challenge`); the points were "
            "committed before the audit (see the commitment below) and asked in the seeded random order the report records, "
            "which the suspect's answers do not depend on (with two sets of points, each set's own order: the answers only "
            "decide which set is asked next, and each set's test runs at alpha/2). Under these, an independent suspect is "
            "called a pirate with probability at most alpha, however long the audit runs.")


@dataclass(frozen=True)
class Verified:
    """The outcome of re-running `verify-report`'s checks for the page."""

    ok: bool
    checks: Sequence[str]
    problem: str = ""  # the first failed check, when not ok
    caveat: str = ""
    signature: str = ""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _band(agreement: float, n: int, mode: str, access: str) -> tuple[float, float]:
    """A 95% two-sided band for the agreement after `n` points: exact for 0/1 scores, else Hoeffding."""
    if n <= 0 or math.isnan(agreement):
        return 0.0, 1.0
    k = agreement * n  # agreements are stored to 4 decimals: k is a whole number within n * 5e-5
    if access == "labels" and mode == "agreement" and abs(k - round(k)) <= n * 5e-5 + 1e-9:
        return clopper_pearson_lower(round(k), n, 0.975), clopper_pearson_upper(round(k), n, 0.975)
    return hoeffding_lower(agreement, n, 0.975), hoeffding_upper(agreement, n, 0.975)


def evidence_svg(trajectory: Sequence[dict[str, Any]], thresholds: dict[str, float], p0: float, p1: float,
                 mode: str, access: str, budget: int) -> str:
    """Two panels: the log-likelihood ratio against the queries with both thresholds, and the
    agreement with its 95% band beside the mean p0 and p1."""
    width, height, left, right = 760, 440, 64, 190
    panel_h, gap, top = 150, 60, 30
    xs_max = max([budget] + [int(s["queries"]) for s in trajectory] or [1])
    plot_w = width - left - right

    def x(q: float) -> float:
        return left + plot_w * q / max(1, xs_max)

    betting = any(s.get("llr_independent") is not None for s in trajectory)
    # The betting test's second bettor (wealth against piracy) is drawn downwards, towards the
    # `independent` threshold ln(beta), so both tests read the same way: up piracy, down independent.
    llrs = [float(s["llr"]) for s in trajectory] + [-float(s["llr_independent"]) for s in trajectory if betting]
    hi_t, lo_t = float(thresholds["piracy"]), float(thresholds["independent"])
    y_top, y_bot = max([hi_t * 1.15] + llrs), min([lo_t * 1.15] + llrs)
    pad = 0.05 * (y_top - y_bot)
    y_top, y_bot = y_top + pad, y_bot - pad

    def y1(v: float) -> float:
        return top + panel_h * (y_top - v) / (y_top - y_bot)

    def y2(v: float) -> float:
        return top + panel_h + gap + panel_h * (1 - v)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="12" role="img" aria-label="evidence against queries">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{panel_h}" fill="#fafafa" stroke="#999"/>',
           f'<rect x="{left}" y="{top + panel_h + gap}" width="{plot_w}" height="{panel_h}" fill="#fafafa" stroke="#999"/>',
           f'<text x="{left}" y="{top - 10}" font-weight="bold">evidence: '
           + ("log wealth against independence (up) and against piracy (down)" if betting else "log-likelihood ratio") + '</text>',
           f'<text x="{left}" y="{top + panel_h + gap - 10}" font-weight="bold">agreement with the owner (95% band)</text>']
    for value, label, colour in ((hi_t, f"piracy threshold {hi_t:+.2f}", "#b00020"), (lo_t, f"independent threshold {lo_t:+.2f}", "#1b5e20"),
                                 (0.0, "0", "#999")):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y1(value):.1f}" y2="{y1(value):.1f}" stroke="{colour}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{left + plot_w + 6}" y="{y1(value) + 4:.1f}" fill="{colour}">{_e(label)}</text>')
    for value, label, colour in ((p1, f"p1 {p1:.3f} (pirates)", "#b00020"), (p0, f"p0 {p0:.3f} (independent)", "#1b5e20")):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y2(value):.1f}" y2="{y2(value):.1f}" stroke="{colour}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{left + plot_w + 6}" y="{y2(value) + 4:.1f}" fill="{colour}">{_e(label)}</text>')
    points = [(0.0, 0.0)] + [(float(s["queries"]), float(s["llr"])) for s in trajectory]
    out.append('<polyline fill="none" stroke="#0d47a1" stroke-width="2" points="'
               + " ".join(f"{x(q):.1f},{y1(v):.1f}" for q, v in points) + '"/>')
    if betting:
        down = [(0.0, 0.0)] + [(float(s["queries"]), -float(s["llr_independent"])) for s in trajectory]
        out.append('<polyline fill="none" stroke="#1b5e20" stroke-width="2" stroke-dasharray="2,2" points="'
                   + " ".join(f"{x(q):.1f},{y1(v):.1f}" for q, v in down) + '"/>')
    steps = [s for s in trajectory if s.get("agreement") is not None and not math.isnan(float(s["agreement"]))]
    if steps:
        bands = [_band(float(s["agreement"]), int(s["queries"]), mode, access) for s in steps]
        polygon = ([f"{x(float(s['queries'])):.1f},{y2(b[1]):.1f}" for s, b in zip(steps, bands, strict=True)]
                   + [f"{x(float(s['queries'])):.1f},{y2(b[0]):.1f}" for s, b in reversed(list(zip(steps, bands, strict=True)))])
        out.append(f'<polygon fill="#90caf9" fill-opacity="0.5" stroke="none" points="{" ".join(polygon)}"/>')
        out.append('<polyline fill="none" stroke="#0d47a1" stroke-width="2" points="'
                   + " ".join(f"{x(float(s['queries'])):.1f},{y2(float(s['agreement'])):.1f}" for s in steps) + '"/>')
    for frac in (0, 0.5, 1):
        q = xs_max * frac
        for base in (top + panel_h, top + 2 * panel_h + gap):
            out.append(f'<text x="{x(q):.1f}" y="{base + 16}" text-anchor="middle">{q:.0f}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">queries (budget {budget})</text>')
    for v in (0, 0.5, 1):
        out.append(f'<text x="{left - 6}" y="{y2(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append("</svg>")
    return "".join(out)


def _facts(content: dict[str, Any], verified: Verified) -> dict[str, Any]:
    res, fp, test = content["result"], content["fingerprint"], content["test"]
    suspect = res.get("suspect") or content.get("suspect") or {}
    signature = fp.get("signature")
    commitment = fp.get("commitment")
    return {
        "verdict": str(res["verdict"]),
        "queries": f"{res['queries_used']} of a budget of {test['budget']} (answers used by the test: {res['answered']})",
        "alpha": res["alpha"], "beta": res["beta"], "p0": round(float(res["p0"]), 4), "p1": round(float(res["p1"]), 4),
        "agreement": "n/a" if res.get("agreement") is None else f"{float(res['agreement']):.3f}",
        "test": f"{test.get('name', 'sequential test')}, mode {res['mode']}, {res['access']} access",
        "fingerprint": fp["sha256"],
        "fingerprint signature": "none" if not signature else f"{signature.get('scheme')} key {signature.get('key_id')}"
        + (" (verified by the auditor)" if fp.get("signature_verified") else " (not verified by the auditor)"),
        "commitment": "none given" if not commitment else f"sha256 {commitment.get('sha256')}, made "
        f"{commitment.get('content', {}).get('created_utc', '?')}",
        "suspect": f"{suspect.get('kind', '?')}: " + ", ".join(f"{k} {v}" for k, v in sorted((suspect.get("identity") or {}).items())),
        "audited": f"{content.get('started_utc')} to {content.get('finished_utc')}",
        "tool": content.get("tool"),
        "report verification": ("passes every check" if verified.ok else f"FAILS: {verified.problem}")
        + (f"; report {verified.signature}" if verified.signature else ""),
    }


def _parts(content: dict[str, Any], verified: Verified) -> tuple[dict[str, Any], str, str, str]:
    """What both formats show: the facts, the headline, what the verdict means, the plot."""
    facts = _facts(content, verified)
    res = content["result"]
    headline, meaning = _MEANING.get(facts["verdict"], (f"Verdict: {facts['verdict']}.", ""))
    svg = evidence_svg(res.get("trajectory") or [], res["thresholds"], float(res["p0"]), float(res["p1"]), str(res["mode"]),
                       str(res["access"]), int(content["test"]["budget"]))
    return facts, headline, meaning.format(**facts), svg


def render_html(content: dict[str, Any], verified: Verified) -> str:
    """The report as one self-contained HTML page."""
    facts, headline, meaning, svg = _parts(content, verified)
    res = content["result"]
    verdict = facts["verdict"]
    colour = {"piracy": "#b00020", "independent": "#1b5e20"}.get(verdict, "#5d4037")
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items() if k != "verdict")
    checks = "".join(f"<li>{_e(c)}</li>" for c in verified.checks)
    notes = "".join(f"<li>{_e(n)}</li>" for n in res.get("notes") or [])
    banner = "" if verified.ok else f'<p class="fail">This report does NOT verify: {_e(verified.problem)}</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DeepCore audit: {_e(verdict)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ color: {colour}; }} .fail {{ background: #ffebee; border: 2px solid #b00020; padding: .6em; font-weight: bold; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ text-align: left; vertical-align: top; padding: .3em .6em;
border-bottom: 1px solid #ddd; word-break: break-all; }} th {{ width: 13em; word-break: normal; }}
.small {{ color: #555; font-size: .9em; }}
</style></head><body>
{banner}
<h1 id="verdict">Verdict: {_e(verdict)}</h1>
<p><strong>{_e(headline)}</strong></p>
<p>{_e(meaning)}</p>
<p class="small">{_e(_ASSUMES)}</p>
<h2>Evidence</h2>
<figure>{svg}<figcaption class="small">Each agreeing answer moves the statistic up, each disagreeing one down; the test stops
the first time it crosses a threshold. The band is where the suspect's agreement lies with 95% confidence after that many
answers.</figcaption></figure>
<h2>Details</h2>
<table>{rows}</table>
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
<h2>Verification</h2>
<p>{_e(facts["report verification"])}{(" — " + _e(verified.caveat)) if verified.caveat else ""}</p>
<ul class="small">{checks}</ul>
</body></html>
"""


def render_markdown(content: dict[str, Any], verified: Verified) -> str:
    """The report as Markdown: the same facts, the trajectory as a table, the plot as an inline image."""
    facts, headline, meaning, svg = _parts(content, verified)
    res = content["result"]
    verdict = facts["verdict"]
    # Every value that comes from the report or the checks goes through _md: a report that fails
    # verification is rendered too, and its content may be anybody's.
    lines = [f"# Verdict: {_md(verdict)}", ""]
    if not verified.ok:
        lines += [f"**This report does NOT verify: {_md(verified.problem)}**", ""]
    lines += [f"**{_md(headline)}**", "", _md(meaning), "", f"_{_ASSUMES}_", "", "## Evidence", "",
              f"![evidence](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})", "",
              "| queries | agreement | statistic | decision |", "|---|---|---|---|"]
    lines += [f"| {_md(s['queries'])} | {_md(s['agreement'])} | {_md(s['llr'])} | {_md(s.get('decision') or '')} |"
              for s in res.get("trajectory") or []]
    lines += ["", "## Details", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_md(v)} |" for k, v in facts.items() if k != "verdict"]
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in res["notes"]]
    lines += ["", "## Verification", "", _md(facts["report verification"]) + (f" ({_md(verified.caveat)})" if verified.caveat else ""), ""]
    lines += [f"- {_md(c)}" for c in verified.checks]
    return "\n".join(lines) + "\n"


def _md(value: Any) -> str:
    """A value as Markdown text: HTML escaped (renderers pass raw HTML through), pipes kept out of tables."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


__all__ = ["FORMATS", "Verified", "evidence_svg", "render_html", "render_markdown"]
