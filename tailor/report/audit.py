"""The HTML audit report: one self-contained file per device and registered version.

`write_report(root, device, version)` reads what the pipeline wrote under `root` (reports/evaluate,
reports/search, artifacts/search, reports/calibrate/DATA_CARD.md, reports/register, dvc.lock) and
writes reports/audit/<device>/<version>.html: gate verdicts, the accuracy table, per-group bias bars
(base vs compressed, the compressed bar's whisker = base + the 95% paired CI of the delta), the search
Pareto front, the chosen bit allocation, the data card, and the commands, git sha and DVC hash that
reproduce it. Plots are inline SVG (matplotlib), so the file opens anywhere, offline.
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GATED_TITLES = {"crows_pairs": "CrowS-Pairs: share of pairs preferring the stereotype (0.5 = none)",
                "bbq": "BBQ: accuracy and bias score per category / context condition",
                "stereoset": "StereoSet (intrasentence): stereotype score, LM score, ICAT",
                "winogender": "Winogender: coreference accuracy by pronoun gender"}


class ReportError(ValueError):
    """Missing or unreadable pipeline outputs: the message names the file."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (run the pipeline, or `tailor evaluate`, first)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg})") from None


def registered_version(root: Path, device: str) -> str:
    """The MLflow model version reports/register/<device>/metrics.json records, or "local"."""
    path = Path(root) / "reports" / "register" / device / "metrics.json"
    if not path.is_file():
        return "local"
    v = _json(path).get("version")
    return f"v{v}" if v is not None else "local"


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog: the SVG sits inside HTML


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or the pipeline machine
    matplotlib.rcParams["svg.hashsalt"] = "tailor"  # stable element ids: same inputs, same bytes
    import matplotlib.pyplot as plt

    return plt


def group_bars(rows: list[dict], title: str) -> str:
    """Grouped horizontal bars base vs compressed for one metric, whiskers = base + 95% CI of the delta."""
    plt = _plt()
    groups = [r["group"] for r in rows]
    h = max(1.6, 0.32 * len(groups) + 0.9)
    fig, ax = plt.subplots(figsize=(7.5, h))
    y = range(len(groups))
    base = [r["base"] for r in rows]
    comp = [r["compressed"] for r in rows]
    lo = [r["compressed"] - (r["base"] + r["ci_low"]) for r in rows]
    hi = [(r["base"] + r["ci_high"]) - r["compressed"] for r in rows]
    ax.barh([i + 0.2 for i in y], base, height=0.38, color="#9aa5b1", label="base")
    ax.barh([i - 0.2 for i in y], comp, height=0.38, color="#2f6fb0", label="compressed",
            xerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]], error_kw={"ecolor": "#222", "capsize": 2})
    ax.set_yticks(list(y), [f"{g} (n={r['n']})" for g, r in zip(groups, rows)], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def pareto_plot(root: Path, device: str) -> str | None:
    rep = Path(root) / "reports" / "search" / device
    if not (rep / "candidates.csv").is_file():
        return None
    plt = _plt()
    cands = list(csv.DictReader((rep / "candidates.csv").open()))
    front = list(csv.DictReader((rep / "pareto.csv").open())) if (rep / "pareto.csv").is_file() else []
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.scatter([float(c["nbytes"]) / 1e6 for c in cands], [float(c["kl"]) for c in cands], s=14, color="#9aa5b1",
               label="candidates")
    if front:
        pts = sorted((float(p["nbytes"]) / 1e6, float(p["kl"])) for p in front)
        ax.plot(*zip(*pts), "o-", color="#2f6fb0", ms=4, label="Pareto front")
    m = rep / "metrics.json"
    if m.is_file():
        met = _json(m)
        ax.scatter([met["bytes"] / 1e6], [met["kl"]], marker="*", s=160, color="#d9822b", label="chosen", zorder=3)
        ax.axvline(met["budget_bytes"] / 1e6, color="#c23030", ls="--", lw=1, label="budget")
    ax.set_xlabel("weight bytes in the device format (MB)")
    ax.set_ylabel("KL to the base model")
    ax.set_title(f"search: {device}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _svg(fig)


def bits_heatmap(root: Path, device: str) -> str | None:
    path = Path(root) / "artifacts" / "search" / device / "config.json"
    if not path.is_file():
        return None
    import numpy as np

    from tailor.arch import MATRICES, SubnetConfig
    from tailor.quant.formats import bits_per_weight

    cfg = SubnetConfig.from_dict(_json(path))
    plt = _plt()
    bits = np.array([[bits_per_weight(lc.bits[m]) if lc.keep else np.nan for m in MATRICES] for lc in cfg.layers], float)
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    im = ax.imshow(bits.T, aspect="auto", cmap="viridis", vmin=2, vmax=16)
    ax.set_yticks(range(len(MATRICES)), list(MATRICES), fontsize=7)
    ax.set_xticks(range(len(cfg.layers)), [str(i) if lc.keep else f"{i}x" for i, lc in enumerate(cfg.layers)],
                  fontsize=6)
    ax.set_xlabel("layer (x = dropped)")
    ax.set_title(f"bits per weight matrix, embedding {cfg.embed_bits}-bit; FFN width and KV groups in the table",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="bits")
    return _svg(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _f(v: Any, d: int = 3) -> str:
    return f"{v:.{d}f}" if isinstance(v, float) else html.escape(str(v))


def _ci(r: dict) -> str:
    return f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def _verdict(g: dict) -> str:
    """pass / fail / indicative; gates.json written before verdicts existed has only `passed`."""
    return g.get("verdict") or ("pass" if g["passed"] else "fail")


def _verdict_cell(v: str) -> str:
    return {"pass": "pass", "fail": "<b>FAIL</b>", "indicative": "<i>indicative</i>"}[v]


def _mde(g: dict) -> str:
    if "mde" not in g:
        return ""
    return _f(g["mde"]) + ("" if g.get("detectable", True) else " (<b>above the margin</b>)")


def _gated(r: dict, min_n: int | None) -> str:
    if not r.get("gated"):
        return ""
    return f"no: n &lt; {min_n}" if min_n is not None and r["n"] < min_n else "yes"


def _git_sha(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "none"


def render(root: Path, device: str, version: str) -> str:
    root = Path(root)
    ev = root / "reports" / "evaluate" / device
    metrics, slices, gates = _json(ev / "metrics.json"), _json(ev / "slices.json"), _json(ev / "gates.json")
    parts = [f"<h1>Tailor audit report: {html.escape(device)} {html.escape(version)}</h1>",
             f"<p class=meta>generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {html.escape(str(root))}; "
             f"bootstrap {metrics.get('bootstrap')} resamples, seed {metrics.get('seed')}, 95% paired percentile CIs</p>"]

    verdict = _verdict(gates).upper()
    css = {"PASS": "passed", "FAIL": "failed", "INDICATIVE": "indicative"}[verdict]
    parts.append(f"<h2>Release gates: <span class={css}>{verdict}</span></h2>")
    parts.append(_table(["gate", "verdict", "value", "threshold", "change [95% CI]", "n",
                         f"detectable change ({gates.get('power', 0.8):.0%} power)", "rule", "reason"],
                        [[g["name"], _verdict_cell(_verdict(g)), _f(g["value"]), _f(g["threshold"]),
                          _ci(g) if "ci_low" in g else "", g.get("n", ""), _mde(g),
                          html.escape(g.get("rule", "")), html.escape(g["reason"])] for g in gates["gates"]]))
    seen = gates.get("gated_groups", [])
    if seen:
        parts.append("<h3>Gated groups: the worsening each can detect</h3>"
                     f"<p class=meta>smallest worsening found with {gates.get('power', 0.8):.0%} power at the group's n; "
                     "a group that cannot detect max_group_worsening makes the group gate indicative, not a pass</p>")
        parts.append(_table(["benchmark", "group", "metric", "n", "delta [95% CI]", "move in worse direction",
                             "detectable change", "can see the threshold"],
                            [[html.escape(u["benchmark"]), html.escape(u["group"]), html.escape(u["metric"]), u["n"],
                              _ci(u), _f(u["worsening"]), _f(u["mde"]), "yes" if u["detectable"] else "<b>no</b>"]
                             for u in seen]))
    ungated = gates.get("ungated_groups", [])
    min_n = next((g.get("min_group_n") for g in gates["gates"] if g["name"] == "group_worsening"), None)
    if ungated:  # gates.json of before evaluate.gates.min_group_n has none
        parts.append(f"<h3>Too small to gate: {len(ungated)} group row(s) with n &lt; {_f(min_n)}</h3>"
                     "<p class=meta>reported, not gated: a bootstrap CI over so few paired items can exclude 0 on "
                     "noise alone (evaluate.gates.min_group_n)</p>")
        parts.append(_table(["benchmark", "group", "metric", "n", "delta [95% CI]", "move in worse direction"],
                            [[html.escape(u["benchmark"]), html.escape(u["group"]), html.escape(u["metric"]), u["n"],
                              _ci(u), _f(u["worsening"])] for u in ungated]))

    parts.append("<h2>Accuracy and perplexity (compressed vs base)</h2>")
    acc_rows = [[r["group"] if r["group"] != "all" else "held-out perplexity", r["metric"], _f(r["base"]),
                 _f(r["compressed"]), _ci(r), r["n"]] for r in slices.get("wiki_ppl", []) + slices.get("accuracy", [])]
    parts.append(_table(["task", "metric", "base", "compressed", "delta [95% CI]", "n"], acc_rows))

    parts.append("<h2>Bias slices per group</h2>")
    for key, title in GATED_TITLES.items():
        rows = slices.get(key)
        if not rows:
            continue
        parts.append(f"<h3>{html.escape(title)}</h3>")
        for metric in dict.fromkeys(r["metric"] for r in rows):
            mrows = [r for r in rows if r["metric"] == metric]
            parts.append(f"<figure class=plot data-plot='{key}-{metric}'>"
                         f"{group_bars(mrows, f'{key}: {metric}')}</figure>")
        # overall rows are headline numbers: the group gate reads only the per-group rows (gates.group_rows)
        allrows = rows + [r | {"gated": False} for r in slices.get(f"{key}_overall", [])]
        parts.append(_table(["group", "metric", "base", "compressed", "delta [95% CI]", "n", "worse if", "gated"],
                            [[r["group"], r["metric"], _f(r["base"]), _f(r["compressed"]), _ci(r), r["n"],
                              r.get("worse", ""), _gated(r, min_n)] for r in allrows]))

    parts.append("<h2>Search</h2>")
    for name, svg in (("pareto", pareto_plot(root, device)), ("bits", bits_heatmap(root, device))):
        parts.append(f"<figure class=plot data-plot='{name}'>{svg}</figure>" if svg else
                     f"<p>no {name} data (search outputs for {html.escape(device)} missing)</p>")
    cfg_path = root / "artifacts" / "search" / device / "config.json"
    if cfg_path.is_file():
        from tailor.arch import SubnetConfig

        cfg = SubnetConfig.from_dict(_json(cfg_path))
        parts.append(_table(["layer", "kept", "KV groups", "FFN width", "bits q/k/v/o/gate/up/down"],
                            [[i, "yes" if lc.keep else "dropped", lc.kv_groups, lc.ffn,
                              "/".join(str(lc.bits[m]) for m in ("q", "k", "v", "o", "gate", "up", "down"))]
                             for i, lc in enumerate(cfg.layers)]))

    card = root / "reports" / "calibrate" / "DATA_CARD.md"
    parts.append("<h2>Data card</h2>")
    if card.is_file():
        import markdown

        parts.append(markdown.markdown(card.read_text(), extensions=["tables"]))
    else:
        parts.append(f"<p>{html.escape(str(card))} missing</p>")

    sha, lock_md5, params_md5 = _git_sha(root), _md5(root / "dvc.lock"), _md5(root / "params.yaml")
    cmds = (f"git checkout {sha}\nmake env                      # pinned environment (requirements.lock, "
            f"requirements-data.txt)\n.venv/bin/dvc pull            # artifacts at dvc.lock md5 {lock_md5}\n"
            f".venv/bin/dvc repro evaluate@{device}\n.venv/bin/tailor evaluate --model artifacts/finetune/{device}\n"
            f".venv/bin/tailor report {device} {version}")
    parts.append("<h2>Reproduce</h2>" + _table(["what", "value"], [["git sha", sha], ["dvc.lock md5", lock_md5],
                                                                  ["params.yaml md5", params_md5]])
                 + f"<pre>{html.escape(cmds)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#1c2127}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccd;padding:3px 6px}"
             "th{background:#eef}.passed{color:#1c6e42}.failed{color:#b52020}.indicative{color:#a66a00}.meta{color:#555;font-size:12px}"
             "figure{margin:.5em 0}pre{background:#f4f5f7;padding:.6em}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Tailor audit {html.escape(device)} "
            f"{html.escape(version)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(root: Path, device: str, version: str | None = None) -> Path:
    """Write reports/audit/<device>/<version>.html under root (atomically); version default: registered or local."""
    root = Path(root)
    registered = registered_version(root, device)
    if version is None:
        version = registered
    elif version.lstrip("v") != registered.lstrip("v"):
        raise ReportError(f"version {version}: reports/register/{device}/metrics.json records {registered}; "
                          "check out the commit that produced that version first")
    elif not version.startswith("v") and version != "local":
        version = f"v{version}"
    out = root / "reports" / "audit" / device / f"{version}.html"
    text = render(root, device, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
